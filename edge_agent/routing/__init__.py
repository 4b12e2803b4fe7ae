"""Where a request is served.

- ``router``   ``RequestRouter``: the pushed policy (local_first, cloud_first, …) decides.
- ``cloud``    ``CloudFallback``: forwards a request to the cloud gateway as the app sent it.
- ``breaker``  the circuit breaker that makes an unreachable cloud cost one fast answer.
"""
