"""The operator console (/ui) in real Chromium (Debian's, driven by Playwright) against a real
control plane, real mosquitto and three real edge agents.

Screenshots of every page land in ``build/console-screenshots/`` (or ``$AUTOGLM_SCREENSHOTS``).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cloud.plane.auth import ApiKeys
from cloud.plane.store import make_engine
from cloud.registry import ModelRegistry, RegistryEntry
from shared.manifest import SignedManifest
from shared.mqtt import BrokerSettings
from shared.signing import SigningKey
from tests.conftest import EdgeProcess
from tests.services import CloudProcess, start_cloud

pytestmark = pytest.mark.timeout(420)

REPO = Path(__file__).resolve().parents[1]
SHOTS = Path(os.environ.get("AUTOGLM_SCREENSHOTS", REPO / "build" / "console-screenshots"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# The flags the machine's closed network needs (no background fetches to Google's hosts).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is not installed (bash .ci/bootstrap.sh installs it)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Tab:
    """One browser context (its own cookies) and page, collecting JavaScript errors."""

    def __init__(self, browser: Any, base: str, width: int = 1280, height: int = 800) -> None:
        self.context = browser.new_context(viewport={"width": width, "height": height})
        self.page = self.context.new_page()
        self.base = base
        self.js_errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.js_errors.append(str(exc)))
        # Pages answered 4xx on purpose (a refused form, another tenant's device) log "Failed
        # to load resource" for the document; any script, style or fetch that fails is an error.
        self.page.on(
            "console",
            lambda msg: (
                self.js_errors.append(msg.text)
                if msg.type == "error" and not msg.text.startswith("Failed to load resource")
                else None
            ),
        )
        self.page.on(
            "response",
            lambda r: (
                self.js_errors.append(f"{r.status} {r.url}")
                if r.status >= 400 and r.request.resource_type != "document"
                else None
            ),
        )
        self.page.on("dialog", lambda dialog: dialog.accept())

    def go(self, path: str) -> Any:
        for attempt in range(5):
            try:
                return self.page.goto(self.base + path)
            except Exception as exc:  # playwright's Error; imported where the browser starts
                # The page navigated by itself meanwhile (its live refresh hit a revoked session
                # and went to the sign-in page; several refreshes in flight may each do so): the
                # same request again, after that navigation. Chromium says either, depending on
                # which navigation it was in.
                interrupted = "ERR_ABORTED" in str(exc) or "interrupted by another navigation" in str(exc)
                if not interrupted or attempt == 4:
                    raise
                self.page.wait_for_load_state()
        raise AssertionError("unreachable")

    def sign_in(self, key: str) -> None:
        self.go("/ui/login")
        self.page.get_by_label("API key").fill(key)
        self.page.get_by_role("button", name="Sign in").click()
        self.page.wait_for_load_state()

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

    def wait_for(self, js: str, timeout_s: float = 120, arg: Any = None) -> None:
        self.page.wait_for_function(js, arg=arg, timeout=timeout_s * 1000)

    def fill_rollout(self, model: str, fields: dict[str, str]) -> None:
        """The new-rollout form: the model, then each field by its label."""
        self.go("/ui/rollouts")
        self.page.get_by_label("Model").select_option(model)
        for label, value in fields.items():
            self.page.get_by_label(label).fill(value)

    def start_rollout(self) -> str:
        """Submit the filled form; the id of the rollout whose page it leads to."""
        self.page.get_by_role("button", name="Start rollout").click()
        self.page.wait_for_url(re.compile(r".*/ui/rollouts/[0-9a-f]{12}.*"))
        return str(self.page.url.split("/ui/rollouts/")[1].split("?")[0])

    def mark(self) -> None:
        """A flag a reload would erase: the page is watched live, never reloaded."""
        self.page.evaluate("window.__notReloaded = true")

    def was_not_reloaded(self) -> bool:
        return bool(self.page.evaluate("window.__notReloaded === true"))

    def close(self) -> None:
        self.context.close()


def _fleet_rows(tab: Tab) -> dict[str, dict[str, str]]:
    rows: dict[str, dict[str, str]] = {}
    for tr in tab.page.locator("table.devices tbody tr[data-device]").all():
        cells = tr.locator("td").all_inner_texts()
        rows[str(tr.get_attribute("data-device"))] = {
            "status": cells[1],
            "model": tr.locator(".model").inner_text(),
            "phase": cells[4],
        }
    return rows


WAVES_DONE = """() => {
  const waves = [...document.querySelectorAll('li.wave')];
  return document.getElementById('rollout-state')?.textContent === 'completed'
    && waves.length > 0 && waves.every(w => w.dataset.healthy === w.dataset.devices);
}"""


def _scratch_version(registry: ModelRegistry, signing_key: SigningKey, demo: RegistryEntry) -> RegistryEntry:
    """demo-glm:scratch, sharing demo-glm:1's blobs: deleting it frees nothing another test needs."""
    manifest = demo.manifest.model_copy(update={"version": "scratch"})
    return registry.publish(SignedManifest.sign(manifest, signing_key))


def test_console_signs_in_watches_rollouts_live_and_keeps_tenants_apart(
    tmp_path: Path,
    broker_settings: BrokerSettings,
    tenant: str,
    registry: ModelRegistry,
    signing_key: SigningKey,
    demo_package: RegistryEntry,
    demo_package_v2: RegistryEntry,
    broken_package: RegistryEntry,
    edge_factory: Callable[..., EdgeProcess],
    chromium: Any,
) -> None:
    other = "o" + tenant[1:]
    (tmp_path / "registries" / other).mkdir(parents=True)
    db = f"sqlite:///{tmp_path / 'cloud.db'}"
    cloud: CloudProcess = start_cloud(
        tmp_path,
        db,
        broker_settings,
        tenant,
        registry,
        extra={"tenants": [tenant, other], "console": {"refresh_s": 0.5}},
    )
    engine = make_engine(db)
    keys = ApiKeys(engine)
    _, operator_key = keys.create(tenant, "ops console", "operator")
    _, inference_key = keys.create(tenant, "an app", "inference")
    _, other_key = keys.create(other, "other ops", "operator")
    _scratch_version(registry, signing_key, demo_package)
    tabs: list[Tab] = []
    try:
        names = [f"edge-{i}" for i in range(3)]
        edges = {
            n: edge_factory(
                device_id=n, tenant=tenant, broker=broker_settings, trusted=[signing_key.public.b64]
            )
            for n in names
        }
        cloud.wait(lambda: len(cloud.devices()) == 3, 60, "three devices to appear")
        for n in names:
            cloud.ok("PUT", f"/v1/devices/{n}/labels", {"labels": {"site": "lab"}})

        # -- sign-in: pages need it; inference keys and wrong keys are refused ----------------
        tab = Tab(chromium, cloud.url)
        tabs.append(tab)
        tab.go("/ui/fleet")
        assert tab.page.url.startswith(f"{cloud.url}/ui/login")
        tab.shot("login")
        tab.sign_in(inference_key)
        assert "operator or admin" in tab.page.locator("#login-error").inner_text()
        tab.sign_in("agk_nothing_wrong")
        assert "unknown" in tab.page.locator("#login-error").inner_text()
        tab.sign_in(cloud.key)  # an admin key
        assert tab.page.url.endswith("/ui/fleet")
        cookie = next(c for c in tab.context.cookies() if c["name"] == "agc_session")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

        # -- fleet: three devices online, live --------------------------------------------------
        tab.wait_for(
            "() => document.querySelectorAll('table.devices tbody tr[data-device] .status.online').length === 3"
        )
        rows = _fleet_rows(tab)
        assert set(rows) == set(names) and {r["status"] for r in rows.values()} == {"online"}
        tab.page.get_by_label("Search id").fill("edge-1")
        tab.page.get_by_role("button", name="Filter").click()
        tab.page.wait_for_load_state()
        assert list(_fleet_rows(tab)) == ["edge-1"]
        tab.go("/ui/fleet?selector=site%3Dnowhere")
        assert _fleet_rows(tab) == {}
        tab.go("/ui/fleet?notice=Paste+your+key+at+evil.example")
        assert tab.page.locator(".notice").count() == 0  # messages never come from the URL
        tab.go("/ui/fleet?sort=device_id&order=desc")
        assert list(_fleet_rows(tab)) == ["edge-2", "edge-1", "edge-0"]

        # -- a three-wave rollout, created in the form and watched to the end without reloading --
        tab.fill_rollout(
            "demo-glm:1",
            {"Label selector": "site=lab", "Waves (cumulative %)": "33, 66, 100", "Health window (s)": "1"},
        )
        tab.wait_for(
            "() => document.getElementById('match-count').textContent.startsWith('3 device(s) match')"
        )
        tab.shot("rollout-new")
        rid = tab.start_rollout()
        tab.mark()
        tab.wait_for("() => document.querySelector('li.wave[data-wave=\"1\"].current') !== null", 120)
        tab.shot("rollout-in-progress")
        tab.wait_for(WAVES_DONE, 180)
        assert tab.was_not_reloaded()
        assert cloud.rollout(rid)["state"] == "completed"
        tab.shot("rollout-completed")
        tab.go("/ui/fleet")
        tab.wait_for(
            "() => [...document.querySelectorAll('table.devices .model')].every(td => td.textContent === 'demo-glm:1')"
        )
        assert {r["model"] for r in _fleet_rows(tab).values()} == {"demo-glm:1"}
        assert "slot a" in tab.page.locator("tr[data-device='edge-0']").inner_text()
        tab.shot("fleet")

        # -- a device page: slots, history, config, charts ------------------------------------------
        for _ in range(6):
            answer = httpx.post(
                f"{edges['edge-0'].api}/v1/completions",
                json={"model": "default", "prompt": "hello", "max_tokens": 4},
                timeout=30,
            )
            assert answer.status_code == 200
        tab.go("/ui/devices/edge-0")
        tab.mark()
        # The telemetry arrives over MQTT and the charts pick it up live.
        tab.wait_for(
            "() => document.getElementById('requests-hour').textContent.startsWith('6 request(s)')", 60
        )
        assert tab.was_not_reloaded()
        assert "requests 6/min" in tab.page.locator("#device-charts").inner_text()
        assert "demo-glm:1" in tab.page.locator("#device-state").inner_text()
        history = tab.page.locator("#device-events").inner_text()
        assert "online" in history and "demo-glm:1" in history and "active" in history
        assert tab.page.locator("svg.chart").count() == 5
        tab.page.get_by_role("button", name="Ping").click()
        tab.page.wait_for_load_state()
        assert "ping: ok" in tab.page.locator(".notice").inner_text()
        tab.shot("device")

        # -- a model that fails its smoke test halts in wave 1; the device is back on v1 -------------
        tab.fill_rollout(
            "demo-glm:broken",
            {
                "Waves (cumulative %)": "33, 100",
                "Halt when more than (% of a wave fails)": "0",
                "Health window (s)": "1",
            },
        )
        tab.start_rollout()
        tab.mark()
        tab.wait_for("() => document.getElementById('rollout-state')?.textContent === 'halted'", 120)
        assert tab.was_not_reloaded()
        message = tab.page.locator("#rollout-message").inner_text()
        assert "wave 1: 1 of 1 device(s) failed" in message and "sent back" in message
        first = tab.page.locator("tr[data-state='rolled_back']").get_attribute("data-device")
        assert tab.page.locator("tr[data-state='pending']").count() == 2
        tab.shot("rollout-halted")
        cloud.wait(
            lambda: (
                cloud.devices()[str(first)]["active_model"] == "demo-glm:1"
                and cloud.devices()[str(first)]["phase"] == "active"
            ),
            60,
            "the wave-1 device back on v1",
        )
        tab.go("/ui/fleet")
        assert {r["model"] for r in _fleet_rows(tab).values()} == {"demo-glm:1"}
        tab.go(f"/ui/devices/{first}")
        assert "failed" in tab.page.locator("#device-events").inner_text()

        # -- pause, resume, abort --------------------------------------------------------------------
        tab.fill_rollout(
            "demo-glm:2",
            {"Waves (cumulative %)": "50, 100", "Health window (s)": "3", "Devices updating at once": "1"},
        )
        rid = tab.start_rollout()
        tab.page.get_by_role("button", name="Pause").click()
        tab.page.wait_for_load_state()
        assert tab.page.locator("#rollout-state").inner_text() == "paused"
        assert cloud.rollout(rid)["state"] == "paused"
        assert tab.page.get_by_role("button", name="Pause").is_disabled()
        # The model a paused rollout uses cannot be deleted: the reason is shown.
        tab.go("/ui/models")
        tab.page.locator("tr[data-model='demo-glm:2'] button", has_text="Delete").click()
        tab.page.wait_for_load_state()
        assert rid in tab.page.locator("#model-error").inner_text()
        tab.shot("models")
        # One nobody uses can.
        tab.page.locator("tr[data-model='demo-glm:scratch'] button", has_text="Delete").click()
        tab.page.wait_for_load_state()
        assert "deleted demo-glm:scratch" in tab.page.locator(".notice").inner_text()
        assert tab.page.locator("tr[data-model='demo-glm:scratch']").count() == 0
        tab.go(f"/ui/rollouts/{rid}")
        tab.page.get_by_role("button", name="Resume").click()
        tab.page.wait_for_load_state()
        tab.mark()
        tab.wait_for(WAVES_DONE, 180)
        assert tab.was_not_reloaded()
        r = cloud.ok(
            "POST",
            "/v1/rollouts",
            {"model": "demo-glm:1", "waves": [34, 100], "allow_downgrade": True, "health_window_s": 30},
        )
        tab.go(f"/ui/rollouts/{r['rollout_id']}")
        tab.page.get_by_role("button", name="Abort").click()
        tab.page.wait_for_load_state()
        assert tab.page.locator("#rollout-state").inner_text() == "aborted"
        assert cloud.rollout(r["rollout_id"])["state"] == "aborted"
        tab.go("/ui/rollouts")
        history = tab.page.locator("#rollout-history").inner_text()
        assert history.count("completed") >= 2 and "halted" in history and "aborted" in history
        tab.shot("rollouts")

        # -- config push: validation errors inline; a good config reaches the devices ----------------
        tab.go("/ui/config")
        tab.page.get_by_label("Config (YAML or JSON)").fill("sampling:\n  temperature: 9\n")
        tab.page.get_by_role("button", name="Validate and push").click()
        tab.page.wait_for_load_state()
        assert "sampling.temperature" in tab.page.locator("#ce-config").inner_text()
        tab.shot("config-invalid")
        tab.page.get_by_label("Label selector").fill("site=lab")
        tab.page.get_by_label("Config (YAML or JSON)").fill("sampling:\n  temperature: 0.5\n")
        tab.page.get_by_role("button", name="Validate and push").click()
        tab.page.wait_for_load_state()
        assert "pushed to 3 device(s)" in tab.page.locator("#config-pushed").inner_text()
        assert all(
            d["desired_config"] == {"sampling": {"temperature": 0.5}} for d in cloud.devices().values()
        )

        # -- a phone's width: the fleet page still reads ----------------------------------------------
        phone = Tab(chromium, cloud.url, width=390, height=844)
        tabs.append(phone)
        phone.sign_in(operator_key)
        assert set(_fleet_rows(phone)) == set(names)
        assert phone.page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        phone.shot("fleet-phone")
        # Keyboard: the skip link is the first stop and takes focus to the content.
        phone.page.keyboard.press("Tab")
        assert phone.page.evaluate("document.activeElement.className") == "skip"

        # -- CSRF: a form without this session's token is refused, and nothing changes --------------
        session_cookie = {c["name"]: c["value"] for c in tab.context.cookies()}
        forged = httpx.post(
            f"{cloud.url}/ui/config",
            data={"selector": "", "config": "sampling:\n  temperature: 1.5\n"},
            cookies=session_cookie,
        )
        assert forged.status_code == 403 and "CSRF" in forged.text
        wrong = httpx.post(
            f"{cloud.url}/ui/rollouts/{rid}/rollback", data={"csrf_token": "guess"}, cookies=session_cookie
        )
        assert wrong.status_code == 403
        assert all(
            d["desired_config"] == {"sampling": {"temperature": 0.5}} for d in cloud.devices().values()
        )
        assert cloud.rollout(rid)["state"] == "completed"

        # -- another tenant sees none of this one's devices, rollouts or pages -----------------------
        stranger = Tab(chromium, cloud.url)
        tabs.append(stranger)
        stranger.sign_in(other_key)
        assert _fleet_rows(stranger) == {}
        assert "0 devices" in stranger.page.locator("#fleet-summary").inner_text()
        assert stranger.go("/ui/devices/edge-0").status == 404
        assert stranger.go(f"/ui/rollouts/{rid}").status == 404
        stranger.go("/ui/rollouts")
        assert "No rollout yet" in stranger.page.locator("#rollout-history").inner_text()
        assert stranger.page.locator("select#f-model option").count() == 1  # only "choose…"

        # -- sign-out ends the session; revoking a key ends its sessions ------------------------------
        stranger.page.get_by_role("button", name="Sign out").click()
        stranger.page.wait_for_load_state()
        stranger.go("/ui/fleet")
        assert "/ui/login" in stranger.page.url
        op_id = operator_key.split("_")[1]
        keys.revoke(tenant, op_id)
        phone.go("/ui/fleet")
        assert "/ui/login" in phone.page.url

        for t in tabs:
            assert t.js_errors == [], t.js_errors
    finally:
        for t in tabs:
            t.close()
        engine.dispose()
        cloud.stop()
