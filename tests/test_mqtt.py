"""The MQTT helpers both sides share."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest
from paho.mqtt.exception import MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from cloud.mqtt.blob_server import BlobServer
from cloud.mqtt.control_link import ControlLink
from cloud.mqtt.local_broker import LocalBroker
from edge_agent.uplink.link import CloudLink
from shared.blobs import BlobStore
from shared.messages import Ack, DeviceStatus
from shared.mqtt import BrokerSettings, ReconnectBackoff, _share_property_tables, make_client, payload_bytes
from shared.topics import Topics


def test_backoff_doubles_to_its_cap_and_resets() -> None:
    b = ReconnectBackoff(0.5, 4.0, jitter=False)
    assert [b.next_delay() for _ in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    b.reset()
    assert b.next_delay() == 0.5


def test_jittered_backoff_stays_within_half_to_one_and_a_half() -> None:
    b = ReconnectBackoff(1.0, 1.0, jitter=True)
    delays = [b.next_delay() for _ in range(200)]
    assert all(0.5 <= d <= 1.5 for d in delays)
    assert max(delays) - min(delays) > 0.5
    assert sum(delays) / len(delays) == pytest.approx(1.0, abs=0.1)


def test_mqtt_v5_properties_encode_and_decode_as_paho_does_with_their_tables_shared() -> None:
    """shared.mqtt makes paho's property tables its class's (a control plane made one object per
    message it read): on the pinned paho it applies, and every object still encodes, decodes,
    checks and clears its own properties as the MQTT v5 specification spells them."""
    assert _share_property_tables() and "names" not in vars(Properties(PacketTypes.PUBLISH))
    p = Properties(PacketTypes.PUBLISH)
    p.ContentType = "x"
    p.UserProperty = [("a", "b")]
    p.UserProperty = ("c", "d")  # a property that may repeat accumulates
    p.MessageExpiryInterval = 60
    # Identifier, then the value, in identifier order: 0x02 four bytes, 0x03 a UTF-8 string, 0x26
    # a string pair (twice).
    wire = b"\x02\x00\x00\x00\x3c\x03\x00\x01x&\x00\x01a\x00\x01b&\x00\x01c\x00\x01d"
    assert p.pack() == bytes([len(wire)]) + wire
    q = Properties(PacketTypes.PUBLISH)
    assert q.isEmpty() and q.json() == {}  # nothing of p's leaked into another object
    _, length = q.unpack(p.pack() + b"payload")
    assert length == len(wire) + 1
    assert q.json() == {
        "ContentType": "x",
        "UserProperty": [("a", "b"), ("c", "d")],
        "MessageExpiryInterval": 60,
    }
    q.clear()
    assert q.isEmpty() and q.pack() == b"\x00"
    with pytest.raises(MQTTException, match="must be one of"):
        q.NoSuchProperty = 1
    with pytest.raises(MQTTException, match="does not apply"):
        q.SessionExpiryInterval = 10  # a CONNECT property
    with pytest.raises(MQTTException, match="more than once"):
        q.unpack(b"\x08\x03\x00\x01x\x03\x00\x01y")  # ContentType twice


def test_clients_send_small_packets_at_once(broker_settings: BrokerSettings) -> None:
    """Nagle's algorithm held a fetch request back for the broker's delayed ACK (40 ms per
    window of a model download): every client socket has TCP_NODELAY."""

    async def option() -> int:
        async with make_client(broker_settings, "nodelay-probe", persistent=False) as client:
            sock = client._client.socket()  # the one place to see the socket
            assert sock is not None
            return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    assert asyncio.run(option()) == 1


def test_hundreds_of_publishes_in_flight_log_no_warning(
    broker_settings: BrokerSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """A rollout has hundreds of desired states and acknowledgements awaiting their PUBACK at
    once; aiomqtt's default warned on each of them (a line per publish in the operator's log)."""

    async def burst() -> None:
        async with make_client(broker_settings, "burst-probe", persistent=False) as client:
            await asyncio.gather(*(client.publish(f"probe/burst/{i}", b"x" * 100, qos=1) for i in range(300)))

    with caplog.at_level(logging.WARNING):
        asyncio.run(burst())
    assert not [r for r in caplog.records if "pending publish calls" in r.getMessage()]


def test_a_local_broker_bridges_the_topics_its_extra_directives_name(tmp_path: Path) -> None:
    """``LocalBroker(extra=...)``: a second mosquitto bridged to the first (what the rollout bench
    does above one process's 20,000 sockets) carries a device's report out and a desired state in,
    and nothing it was not told to carry."""
    with LocalBroker(workdir=tmp_path / "core") as core:
        bridge = [
            "connection edge",
            f"address 127.0.0.1:{core.port}",
            "topic fleet/+/desired in 1",
            "topic fleet/+/reported out 1",
            "cleansession true",
            "notifications false",
        ]
        with LocalBroker(workdir=tmp_path / "edge", extra=bridge) as edge:
            assert "connection edge" in (edge.workdir / "mosquitto.conf").read_text()

            async def crossing() -> tuple[bytes, bytes]:
                core_s = BrokerSettings(host=core.host, port=core.port)
                edge_s = BrokerSettings(host=edge.host, port=edge.port)
                async with (
                    make_client(core_s, "cloud", persistent=False) as cloud,
                    make_client(edge_s, "dev-1", persistent=False) as device,
                ):
                    await cloud.subscribe("fleet/+/reported", qos=1)
                    await cloud.subscribe("fleet/+/telemetry", qos=1)
                    await device.subscribe("fleet/dev-1/desired", qos=1)
                    await asyncio.sleep(0.5)  # the bridge's subscriptions reach the core
                    await device.publish("fleet/dev-1/telemetry", b"not bridged", qos=1)
                    await device.publish("fleet/dev-1/reported", b"report", qos=1)
                    report = await asyncio.wait_for(anext(aiter(cloud.messages)), 10)
                    await cloud.publish("fleet/dev-1/desired", b"desired", qos=1)
                    desired = await asyncio.wait_for(anext(aiter(device.messages)), 10)
                    assert str(report.topic) == "fleet/dev-1/reported"
                    return payload_bytes(report), payload_bytes(desired)

            assert asyncio.run(crossing()) == (b"report", b"desired")


def test_a_device_answers_a_late_last_will_with_online(broker_settings: BrokerSettings, tenant: str) -> None:
    """A broker may publish the Last Will of a connection it replaced (MQTT 5 has it published
    on a session takeover) after the new connection said ``online``: the control
    plane would record a serving device offline, and so would the retained presence. The agent
    hears its own status and says ``online`` again. A retained ``offline`` found on subscribing
    (the will of the last connection, before this one's ``online``) is not answered."""
    topics = Topics(tenant)
    device = "dev-" + tenant  # its own persistent session, not another test's
    topic = topics.status(device)
    offline = DeviceStatus(device_id=device, state="offline").to_json()

    async def scenario() -> tuple[list[str], int, str]:
        async with make_client(broker_settings, f"watch-{tenant}", persistent=False) as watcher:
            # The will of an earlier session, retained before this one connects.
            await watcher.publish(topic, offline, qos=1, retain=True)
            await watcher.subscribe(topic, qos=1)
            seen: list[str] = []

            async def states(n: int) -> None:
                async for m in watcher.messages:
                    seen.append(DeviceStatus.from_json(payload_bytes(m)).state)
                    if len(seen) == n:
                        return

            await asyncio.wait_for(states(1), 10)  # the retained offline
            link = CloudLink(
                broker_settings, topics, device, on_desired=lambda _d: None, on_chunk=lambda *_: None
            )
            task = asyncio.create_task(link.run())
            try:
                await asyncio.wait_for(link.connected.wait(), 10)
                await asyncio.wait_for(states(2), 10)  # its online
                # The late will, live, after this session's online. (Had the agent answered the
                # retained one too, its second online would come before this offline.)
                await watcher.publish(topic, offline, qos=1, retain=True)
                await asyncio.wait_for(states(4), 10)
                stale = link.stale_wills
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        async with make_client(broker_settings, f"late-{tenant}", persistent=False) as late:
            await late.subscribe(topic, qos=1)
            retained = await asyncio.wait_for(anext(aiter(late.messages)), 10)
            # Take the retained presence down with the test's tenant.
            await late.publish(topic, b"", qos=1, retain=True)
        return seen, stale, DeviceStatus.from_json(payload_bytes(retained)).state

    seen, stale, retained = asyncio.run(scenario())
    assert seen == ["offline", "online", "offline", "online"]
    assert stale == 1
    assert retained == "online", "a subscriber arriving later finds the device online"


def test_the_cloud_hears_a_nodes_bridge_go_down_as_its_device_offline(
    broker_settings: BrokerSettings, tenant: str, tmp_path: Path
) -> None:
    """An agent behind its node's local broker (kubeedge/mosquitto-bridge.yaml) has its Last Will
    there: when the node dies, only the bridge's own will ("0" on the device's ``bridge`` topic)
    reaches the cloud. The control link records the device offline on it; "1" leaves the status
    to the agent's own presence, and anything else is dropped. A control plane that starts (or
    reconnects) later finds the device offline too, not the stale retained ``online`` the bridge
    last carried; once the bridge is up again, the status it carries counts."""
    topics = Topics(tenant)
    online = DeviceStatus(device_id="node-1", state="online").to_json()

    def link(heard: list[DeviceStatus], name: str) -> ControlLink:
        store = BlobStore(tmp_path / name)
        return ControlLink(
            broker_settings,
            topics,
            BlobServer(store, topics),
            client_id=f"{name}-{tenant}",
            on_status=heard.append,
        )

    async def running(cloud: ControlLink) -> asyncio.Task[None]:
        task = asyncio.create_task(cloud.run())
        await asyncio.wait_for(cloud.connected.wait(), 10)
        return task

    async def stop(task: asyncio.Task[None]) -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def scenario() -> tuple[list[str], int, list[str], list[str]]:
        first: list[DeviceStatus] = []
        cloud = link(first, "cloud")
        task = await running(cloud)
        async with make_client(broker_settings, f"bridge-{tenant}", persistent=False) as node:
            try:
                await node.publish(topics.bridge("node-1"), b"1", qos=1, retain=True)
                await node.publish(topics.status("node-1"), online, qos=1, retain=True)
                await node.publish(topics.bridge("node-1"), b"up", qos=1)
                await cloud.wait_for(
                    lambda d: d.get("node-1") is not None and d["node-1"].status == "online", 10
                )
                await node.publish(topics.bridge("node-1"), b"0", qos=1, retain=True)
                await cloud.wait_for(lambda d: d["node-1"].status == "offline", 10)
                dropped = cloud.dropped_messages  # b"up", heard before the "0"
            finally:
                await stop(task)
            # A control plane starting now: the retained "0" and the retained online are there.
            later: list[DeviceStatus] = []
            restarted = link(later, "restarted")
            task = await running(restarted)
            try:
                await restarted.wait_for(lambda d: d.get("node-1") is not None, 10)
                await asyncio.sleep(0.5)  # the retained status, had it counted, would be in by now
                before = [s.state for s in later]
                # The bridge comes back and carries the agent's status again.
                await node.publish(topics.bridge("node-1"), b"1", qos=1, retain=True)
                await node.publish(topics.status("node-1"), online, qos=1, retain=True)
                await restarted.wait_for(lambda d: d["node-1"].status == "online", 10)
                after = [s.state for s in later]
            finally:
                await stop(task)
                for channel in ("bridge", "status"):  # take the retained state down with the tenant
                    await node.publish(topics.device("node-1", channel), b"", qos=1, retain=True)
        return [s.state for s in first], dropped, before, after

    first, dropped, before, after = asyncio.run(scenario())
    assert first == ["online", "offline"]
    assert dropped == 1
    assert before == ["offline"], "a restarted control plane believes the bridge, not the stale status"
    assert after == ["offline", "online"]


class _StuckClient:
    """A session whose messages never come and whose ``async with`` exit fails, as aiomqtt's does
    when the broker does not acknowledge the DISCONNECT in time."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.messages = self._never()

    async def _never(self) -> AsyncIterator[Any]:
        await asyncio.Event().wait()
        yield  # pragma: no cover

    async def __aenter__(self) -> _StuckClient:
        self.entered.set()
        return self

    async def __aexit__(self, *exc: object) -> None:
        raise aiomqtt.MqttError("Disconnected during message iteration")

    async def subscribe(self, *args: Any, **kwargs: Any) -> None:
        pass

    async def publish(self, *args: Any, **kwargs: Any) -> None:
        pass


@pytest.mark.parametrize("side", ["cloud", "device"])
def test_a_link_told_to_stop_stops_even_when_the_disconnect_fails(
    side: str, tenant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The MqttError of a failed disconnect replaces the CancelledError that caused it; the
    reconnect loops must not take it for a lost broker and run on."""
    import cloud.mqtt.control_link as control_link
    import edge_agent.uplink.link as uplink

    stuck = _StuckClient()
    module = control_link if side == "cloud" else uplink
    monkeypatch.setattr(module, "make_client", lambda *a, **k: stuck)
    settings = BrokerSettings(host="127.0.0.1", port=1, reconnect_initial_s=0.05)
    topics = Topics(tenant)

    async def scenario() -> bool:
        if side == "cloud":
            runner = control_link.CloudSession(settings, "cloud", []).run()
        else:
            link = CloudLink(settings, topics, "dev-1", on_desired=lambda _d: None, on_chunk=lambda *_: None)
            runner = link.run()
        task = asyncio.create_task(runner)
        await asyncio.wait_for(stuck.entered.wait(), 5)
        await asyncio.sleep(0.05)
        task.cancel()
        await asyncio.wait([task], timeout=5)
        stopped = task.done() and task.cancelled()
        if not task.done():
            task.cancel()  # the bug: cancel again so the test ends
            await asyncio.gather(task, return_exceptions=True)
        return stopped

    assert asyncio.run(scenario())


@pytest.mark.parametrize("side", ["cloud", "device"])
def test_a_message_whose_handling_fails_does_not_end_the_session(
    side: str, tenant: str, broker_settings: BrokerSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """An unexpected error while handling one message (a bug, a registry file being rewritten, a
    full disk) is logged and the next message is handled on the same session: on the control
    plane such an error used to end the replica's session, and with it the task group of its
    rollout driver."""
    topics = Topics(tenant)
    handled: list[str] = []

    def handler(name: str) -> None:
        handled.append(name)
        if len(handled) == 1:
            raise RuntimeError("a handler's bug")

    async def scenario() -> tuple[list[str], int]:
        if side == "cloud":
            link = ControlLink(
                broker_settings,
                topics,
                BlobServer(BlobStore(Path("/nonexistent")), topics),
                client_id=f"cloud-{tenant}",
                on_status=lambda status: handler(status.state),
            )
            attach = link.attach
            connects: list[int] = []

            async def counted(client: aiomqtt.Client) -> None:
                connects.append(1)
                await attach(client)

            link.attach = counted  # type: ignore[method-assign]
            task = asyncio.create_task(link.run())
            ready = link.connected
            topic, body = topics.status("dev-9"), DeviceStatus(device_id="dev-9", state="online").to_json()
        else:
            device = CloudLink(
                broker_settings,
                topics,
                "dev-9",
                on_desired=lambda _d: None,
                on_chunk=lambda *_: None,
                on_ack=lambda ack: handler(ack.ids[0]),
            )
            task = asyncio.create_task(device.run())
            ready = device.connected
            topic, body = topics.acks("dev-9"), Ack(ids=["record-1"]).to_json()
        try:
            await asyncio.wait_for(ready.wait(), 10)
            async with make_client(broker_settings, f"sender-{side}", persistent=False) as sender:
                for n in range(1, 3):
                    await sender.publish(topic, body, qos=1)
                    for _ in range(250):
                        if len(handled) >= n or task.done():
                            break
                        await asyncio.sleep(0.02)
            sessions = device.sessions if side == "device" else len(connects)
            assert not task.done(), "the session ended"
            return handled, sessions
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    with caplog.at_level(logging.ERROR):
        seen, sessions = asyncio.run(scenario())
    assert len(seen) == 2, "the message after the failing one was handled"
    assert sessions == 1, "on the same session, not after a reconnect"
    failures = [r for r in caplog.records if "error while handling a message" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info is not None, "logged once, with its traceback"


def test_a_command_is_answered_only_by_the_device_it_was_sent_to(
    broker_settings: BrokerSettings, tenant: str
) -> None:
    """Replies were matched by request id alone: another device (on its own replies topic, with
    the id seen on an open broker) answered for the one commanded."""
    from shared.messages import Command, CommandReply
    from tests.services import CONTROL_SIGNER

    topics = Topics(tenant)
    link = ControlLink(
        broker_settings,
        topics,
        BlobServer(BlobStore(Path("/nonexistent")), topics),
        signer=CONTROL_SIGNER,
        client_id=f"cloud-{tenant}",
    )

    async def scenario() -> tuple[CommandReply | None, int]:
        task = asyncio.create_task(link.run())
        try:
            await asyncio.wait_for(link.connected.wait(), 10)
            async with make_client(broker_settings, f"devices-{tenant}", persistent=False) as devices:
                await devices.subscribe(topics.commands("dev-x"), qos=1)

                async def answer() -> None:
                    async for message in devices.messages:
                        request_id = json.loads(payload_bytes(message))["request_id"]
                        for who in ("dev-y", "dev-x"):  # the forger first
                            reply = CommandReply(request_id=request_id, device_id=who, ok=True, detail=who)
                            await devices.publish(topics.replies(who), reply.to_json(), qos=1)
                            await asyncio.sleep(0.3)
                        return

                answering = asyncio.create_task(answer())
                command = Command(request_id="req-1", action="ping")
                reply = await link.send_command("dev-x", command, wait_s=10)
                await answering
            return reply, link.impersonations
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    reply, impersonations = asyncio.run(scenario())
    assert reply is not None and reply.device_id == "dev-x" and reply.detail == "dev-x"
    assert impersonations == 1


def test_starting_a_started_broker_again_starts_no_second_one() -> None:
    """``with LocalBroker() as b: b.start()`` (two benches did it) started a second mosquitto in
    the first's place, and the first outlived the bench."""
    with LocalBroker() as broker:
        first = broker._proc
        assert first is not None and broker.start() is broker and broker._proc is first
    assert first.poll() is not None
