"""Signed control messages and anti-rollback (issue 12, items 1, 5 and 6), attacked the way
anyone on the broker could: a real agent process, a real mosquitto, every refusal visible in what
the device reports."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from cloud.registry import ModelRegistry, RegistryEntry
from shared.control import ControlVerifier, sign, signed_wire
from shared.errors import ControlRejected
from shared.messages import Command, DesiredState, ModelRef, Phase, ReportedState, utc_now
from shared.mqtt import BrokerSettings
from shared.signing import SigningKey
from tests.conftest import DEVICE, BackgroundCloud, EdgeProcess, is_active
from tests.services import CONTROL_KEY, CONTROL_SIGNER, control_key_file, start_cloud

pytestmark = pytest.mark.slow


# -- the verifier alone --------------------------------------------------------------------------
def _verifier(**kw: Any) -> ControlVerifier:
    return ControlVerifier([CONTROL_KEY.public], device_id="d1", tenant="t", **kw)


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda: DesiredState(revision=1), "unsigned"),
        (
            lambda: sign(
                DesiredState(revision=1), SigningKey.generate(), device_id="d1", tenant="t", ttl_s=60
            ),
            "untrusted_key",
        ),
        (
            lambda: sign(
                DesiredState(revision=1), CONTROL_KEY, device_id="d1", tenant="t", ttl_s=60
            ).model_copy(update={"allow_downgrade": True}),
            "bad_signature",
        ),
        (
            lambda: CONTROL_SIGNER.desired(DesiredState(revision=1), device_id="d2", tenant="t"),
            "wrong_device",
        ),
        (
            lambda: CONTROL_SIGNER.desired(DesiredState(revision=1), device_id="d1", tenant="u"),
            "wrong_device",
        ),
        (
            lambda: sign(DesiredState(revision=1), CONTROL_KEY, device_id="d1", tenant="t", ttl_s=-301),
            "expired",
        ),
        (
            lambda: sign(
                Command(request_id="r", action="rollback"),
                CONTROL_KEY,
                device_id="d1",
                tenant="t",
                ttl_s=-400,
            ),
            "expired",
        ),
    ],
)
def test_the_verifier_refuses_with_a_reason(make: Callable[[], Any], code: str) -> None:
    message = make()
    # What the device parses off the wire, not the object in hand.
    parsed = type(message).from_json(message.to_json())
    with pytest.raises(ControlRejected) as refused:
        _verifier().check(parsed)
    assert refused.value.code == code


def test_the_verifier_accepts_its_own_and_allows_clock_skew() -> None:
    signed = CONTROL_SIGNER.desired(
        DesiredState(revision=7, config={"sampling": {"temperature": 0.7}}), device_id="d1", tenant="t"
    )
    _verifier().check(DesiredState.from_json(signed.to_json()))
    late = sign(DesiredState(revision=1), CONTROL_KEY, device_id="d1", tenant="t", ttl_s=-60)
    _verifier(max_clock_skew_s=300).check(DesiredState.from_json(late.to_json()))
    ahead = _verifier(clock=lambda: utc_now() + timedelta(days=40))
    with pytest.raises(ControlRejected, match="expired"):
        ahead.check(DesiredState.from_json(signed.to_json()))


def test_the_wire_form_made_while_signing_is_the_messages_own() -> None:
    """The control plane publishes the bytes ``signed_wire`` makes beside the signed message (one
    dump, not one more per step): they must be that message's ``to_json()`` byte for byte, and
    verify on the device as parsed from them, whatever the content (a model, a nested config,
    text beyond ASCII, a command)."""
    model = ModelRef(name="smollm2", version="1.0.0", manifest_digest="sha256:" + "ab" * 32, manifest_size=9)
    for message in (
        DesiredState(revision=3),
        DesiredState(
            revision=7,
            model=model,
            config={"sampling": {"temperature": 0.7, "stop": ["ü", "\n"]}, "slots": 4},
            allow_downgrade=True,
        ),
        Command(request_id="req-0001", counter=5, action="ping", args={"note": "ü"}),
    ):
        signed, wire = signed_wire(message, CONTROL_KEY, device_id="d1", tenant="t", ttl_s=60)
        assert wire == signed.to_json()
        assert signed == sign(
            message, CONTROL_KEY, device_id="d1", tenant="t", ttl_s=60, now=signed.issued_at
        )
        _verifier().check(type(message).from_json(wire))
    signed, wire = CONTROL_SIGNER.desired_wire(DesiredState(revision=9), device_id="d1", tenant="t")
    assert wire == signed.to_json()
    _verifier().check(DesiredState.from_json(wire))


# -- against a real agent -------------------------------------------------------------------------
class _Catcher(http.server.BaseHTTPRequestHandler):
    """An attacker's 'cloud': counts what reaches it and what authorization came along."""

    hits: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        _Catcher.hits.append(self.headers.get("authorization", ""))
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "stolen"}}]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def attacker_url() -> Iterator[str]:
    _Catcher.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Catcher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def _chat(edge: EdgeProcess) -> httpx.Response:
    return httpx.post(
        f"{edge.api}/v1/chat/completions",
        json={"model": "demo-glm", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
        timeout=60,
    )


def _refused(code: str) -> Callable[[ReportedState], bool]:
    return lambda r: r.control_error is not None and r.control_error.code == code


def _rejections(edge: EdgeProcess) -> int:
    n: int = httpx.get(f"{edge.api}/v1/agent", timeout=5).json()["control_rejections"]
    return n


def test_forged_desired_states_are_refused_and_reported(
    demo_package: RegistryEntry,
    edge_factory: Callable[..., EdgeProcess],
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
    attacker_url: str,
) -> None:
    """Item 1: unsigned, forged, altered, misaddressed, expired and replayed desired states
    (each trying to send prompts and the fallback key to an attacker) change nothing; the device
    reports why it refused each. Only a URL on the device's own allow-list may be pushed."""
    edge = edge_factory(
        device_id=DEVICE,
        tenant=tenant,
        broker=broker_settings,
        trusted=[signing_key.public.b64],
        extra={
            "router": {"cloud_url": "http://127.0.0.1:9/v1"},
            "fallback": {"api_key": "the-fleet-secret", "allowed_urls": ["http://127.0.0.1:9/v2"]},
        },
    )
    steal = {"router": {"policy": "cloud_only", "cloud_url": attacker_url}}
    topic = f"autoglm/v1/{tenant}/devices/{DEVICE}/desired"
    with BackgroundCloud(broker_settings, tenant, registry) as cloud:
        cloud.set_desired(DEVICE, DesiredState(revision=1, model=demo_package.ref))
        cloud.wait_reported(DEVICE, is_active(demo_package, 1))
        edge.wait_ready()
        first = CONTROL_SIGNER.desired(
            DesiredState(revision=1, model=demo_package.ref), device_id=DEVICE, tenant=tenant
        )

        attacks: list[tuple[bytes, str]] = [
            (DesiredState(revision=5, model=demo_package.ref, config=steal).to_json(), "unsigned"),
            (
                sign(
                    DesiredState(revision=5, config=steal),
                    SigningKey.generate(),
                    device_id=DEVICE,
                    tenant=tenant,
                    ttl_s=600,
                ).to_json(),
                "untrusted_key",
            ),
            (
                CONTROL_SIGNER.desired(DesiredState(revision=5), device_id=DEVICE, tenant=tenant)
                .model_copy(update={"config": steal})
                .to_json(),
                "bad_signature",
            ),
            (
                CONTROL_SIGNER.desired(
                    DesiredState(revision=5, config=steal), device_id="dev-other", tenant=tenant
                ).to_json(),
                "wrong_device",
            ),
            (
                sign(
                    DesiredState(revision=5, config=steal),
                    CONTROL_KEY,
                    device_id=DEVICE,
                    tenant=tenant,
                    ttl_s=-3600,
                ).to_json(),
                "expired",
            ),
        ]
        for payload, code in attacks:
            before = _rejections(edge)
            cloud.publish_raw(topic, payload)
            reported = cloud.wait_reported(DEVICE, _refused(code), timeout=30)
            assert _rejections(edge) == before + 1
            assert reported.revision == 1 and reported.phase == Phase.ACTIVE
            r = _chat(edge)
            assert r.status_code == 200 and r.headers["x-autoglm-served-by"] == "local", code
        assert _Catcher.hits == []

        # A signed push to a URL this device does not allow: the config is refused, nothing moves.
        cloud.set_desired(DEVICE, DesiredState(revision=2, model=demo_package.ref, config=steal))
        reported = cloud.wait_reported(DEVICE, lambda r: r.config_error is not None and r.revision == 2)
        assert reported.config_error is not None and "allowed_urls" in reported.config_error.message
        assert reported.control_error is None  # it was the control plane's, just not acceptable
        assert _chat(edge).headers["x-autoglm-served-by"] == "local"
        # One the device allows is taken.
        allowed = {"router": {"cloud_url": "http://127.0.0.1:9/v2", "policy": "local_first"}}
        cloud.set_desired(DEVICE, DesiredState(revision=3, model=demo_package.ref, config=allowed))
        cloud.wait_reported(DEVICE, lambda r: r.config_revision == 3 and r.config_error is None)

        # The legitimate revision 1, captured earlier and replayed after 3, is refused.
        cloud.publish_raw(topic, first.to_json())
        reported = cloud.wait_reported(DEVICE, _refused("stale_revision"), timeout=30)
        assert reported.revision == 3 and reported.config_revision == 3
    assert _Catcher.hits == []
    assert "refused a control message (unsigned)" in edge.log_text()


def test_commands_must_be_signed_fresh_and_never_replayed(
    demo_package: RegistryEntry,
    demo_package_v2: RegistryEntry,
    edge_factory: Callable[..., EdgeProcess],
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
) -> None:
    """Item 6: an unsigned or expired rollback, or a replay of an obeyed one, is refused; the
    control plane's signed rollback is obeyed once."""
    edge = edge_factory(
        device_id=DEVICE, tenant=tenant, broker=broker_settings, trusted=[signing_key.public.b64]
    )
    topic = f"autoglm/v1/{tenant}/devices/{DEVICE}/commands"
    with BackgroundCloud(broker_settings, tenant, registry) as cloud:
        cloud.set_desired(DEVICE, DesiredState(revision=1, model=demo_package.ref))
        cloud.wait_reported(DEVICE, is_active(demo_package, 1))
        cloud.set_desired(DEVICE, DesiredState(revision=2, model=demo_package_v2.ref))
        cloud.wait_reported(DEVICE, is_active(demo_package_v2, 2))

        cloud.publish_raw(topic, Command(request_id="evil-1", action="rollback", counter=10**12).to_json())
        cloud.wait_reported(DEVICE, _refused("unsigned"), timeout=30)
        stale = sign(
            Command(request_id="evil-2", action="rollback", counter=10**12),
            CONTROL_KEY,
            device_id=DEVICE,
            tenant=tenant,
            ttl_s=-3600,
        )
        cloud.publish_raw(topic, stale.to_json())
        cloud.wait_reported(DEVICE, _refused("expired"), timeout=30)
        assert edge.wait_ready()["model"] == "demo-glm:2"

        ping = cloud.command(DEVICE, "ping", wait_s=20)
        assert ping is not None and ping.ok and ping.detail == "pong"
        counter = cloud._counter + 1
        obeyed = CONTROL_SIGNER.command(
            Command(request_id="op-1", action="rollback", counter=counter), device_id=DEVICE, tenant=tenant
        )
        cloud.publish_raw(topic, obeyed.to_json())
        cloud.wait_reported(
            DEVICE, lambda r: r.active_slot is not None and r.slots[r.active_slot] == demo_package.ref
        )
        # Back to 2 (the desired state still names it), then the same rollback replayed.
        cloud.set_desired(DEVICE, DesiredState(revision=3, model=demo_package_v2.ref))
        cloud.wait_reported(DEVICE, is_active(demo_package_v2, 3))
        cloud.publish_raw(topic, obeyed.to_json())
        cloud.wait_reported(DEVICE, _refused("replayed_command"), timeout=30)
        time.sleep(0.5)
        assert edge.wait_ready()["model"] == "demo-glm:2"


def test_downgrades_need_a_signed_authorization(
    demo_package: RegistryEntry,
    demo_package_v2: RegistryEntry,
    edge_factory: Callable[..., EdgeProcess],
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
) -> None:
    """Item 5: an older release is refused (from the standby slot, and freshly fetched) unless
    the signed desired state says it is a rollback; the manifest must be the one the desired
    state names."""
    assert demo_package_v2.manifest.release_number > demo_package.manifest.release_number > 0
    edge = edge_factory(
        device_id=DEVICE, tenant=tenant, broker=broker_settings, trusted=[signing_key.public.b64]
    )
    with BackgroundCloud(broker_settings, tenant, registry) as cloud:
        cloud.set_desired(DEVICE, DesiredState(revision=1, model=demo_package.ref))
        cloud.wait_reported(DEVICE, is_active(demo_package, 1))
        cloud.set_desired(DEVICE, DesiredState(revision=2, model=demo_package_v2.ref))
        cloud.wait_reported(DEVICE, is_active(demo_package_v2, 2))

        # Version 1 sits in the standby slot: switching to it without authorization is refused.
        cloud.set_desired(DEVICE, DesiredState(revision=3, model=demo_package.ref))
        failed = cloud.wait_reported(DEVICE, lambda r: r.phase == Phase.FAILED)
        assert failed.last_error is not None and failed.last_error.code == "downgrade_refused"
        assert "below release" in failed.last_error.message
        assert edge.wait_ready()["model"] == "demo-glm:2"

        # Desired name:version must be what the signed manifest says (a v1 manifest named as v9).
        mislabeled = demo_package.ref.model_copy(update={"version": "9"})
        cloud.set_desired(DEVICE, DesiredState(revision=4, model=mislabeled))
        failed = cloud.wait_reported(DEVICE, lambda r: r.phase == Phase.FAILED and r.target_revision == 4)
        assert failed.last_error is not None and failed.last_error.code == "signature_rejected"
        assert "the signed manifest is demo-glm:1" in failed.last_error.message

        # With the operator's authorization (what `rollout rollback` signs), it goes back.
        cloud.set_desired(DEVICE, DesiredState(revision=5, model=demo_package.ref, allow_downgrade=True))
        cloud.wait_reported(DEVICE, is_active(demo_package, 5))
        assert edge.wait_ready()["model"] == "demo-glm:1"

    # The highest release installed survives a restart; a never-installed older one is refused too.
    state = json.loads((edge.data_dir / "state.json").read_text())
    assert state["releases"]["demo-glm"] == demo_package_v2.manifest.release_number


def test_a_device_back_after_its_desired_state_expired_gets_it_signed_afresh(
    tmp_path: Path,
    demo_package: RegistryEntry,
    edge_factory: Callable[..., EdgeProcess],
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
) -> None:
    """A retained desired state outlives its expiry while its device is away: the device refuses
    it as expired on its return, reports so, and the control plane signs the same state again."""
    cloud = start_cloud(
        tmp_path / "cloud",
        f"sqlite:///{tmp_path / 'cp.sqlite3'}",
        broker_settings,
        tenant,
        registry,
        extra={"control": {"key_file": str(control_key_file(tmp_path)), "desired_ttl_s": 10}},
    )
    strict = {"control": {"trusted_keys": [CONTROL_KEY.public.b64], "max_clock_skew_s": 0}}
    try:
        edge = edge_factory(
            device_id=DEVICE,
            tenant=tenant,
            broker=broker_settings,
            trusted=[signing_key.public.b64],
            extra=strict,
        )
        cloud.wait(lambda: cloud.devices().get(DEVICE, {}).get("status") == "online", 30, "the device")
        r = cloud.ok("POST", "/v1/rollouts", {"model": "demo-glm:1", "waves": [100], "health_window_s": 0})
        cloud.wait_rollout(r["rollout_id"], ("completed",))
        edge.proc.kill()
        edge.proc.wait(10)
        cloud.wait(lambda: cloud.devices()[DEVICE]["status"] == "offline", 30, "the Last Will")
        pushed = cloud.ok("POST", "/v1/config", {"config": {"sampling": {"temperature": 0.5}}})
        assert pushed["devices"] == [DEVICE]
        revision = cloud.devices()[DEVICE]["desired_revision"]
        time.sleep(11)  # the retained desired state expires on the broker meanwhile
        edge = edge_factory(
            device_id=DEVICE,
            tenant=tenant,
            broker=broker_settings,
            trusted=[signing_key.public.b64],
            extra=strict,
        )
        cloud.wait(
            lambda: cloud.devices()[DEVICE]["reported_revision"] == revision,
            60,
            "the re-signed desired state applied",
        )
        assert "refused a control message (expired)" in edge.log_text()
        assert any("re-signing the expired desired state" in line for line in cloud.lines)
        assert cloud.devices()[DEVICE]["control_error"] is None
    finally:
        cloud.stop()
