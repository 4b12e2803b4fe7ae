"""The ``autoglm`` command line as an operator runs it (subprocesses, real files, real broker)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

COMMANDS = [
    [],
    ["model"],
    ["model", "import"],
    ["model", "package"],
    ["model", "demo"],
    ["model", "ls"],
    ["model", "show"],
    ["model", "key"],
    ["model", "gc"],
    ["model", "attach-source"],
    ["edge"],
    ["edge", "run"],
    ["cloud"],
    ["cloud", "blobs"],
    ["cloud", "assign"],
    ["cloud", "serve"],
    ["cloud", "key"],
    ["cloud", "key", "create"],
    ["cloud", "key", "ls"],
    ["cloud", "key", "revoke"],
    ["cloud", "control-key"],
    ["fleet"],
    ["fleet", "ls"],
    ["fleet", "label"],
    ["fleet", "command"],
    ["fleet", "enroll"],
    ["fleet", "broker-config"],
    ["rollout"],
    *[["rollout", c] for c in ("create", "ls", "status", "pause", "resume", "abort", "rollback")],
    ["config"],
    ["config", "push"],
    ["pool"],
    ["pool", "serve"],
    ["pool", "fetch"],
    ["demo"],
]


def autoglm(*args: str, home: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cloud.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "AUTOGLM_HOME": str(home), "COLUMNS": "200"},
    )


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "autoglm")
def test_every_command_has_help(cmd: list[str], tmp_path: Path) -> None:
    r = autoglm(*cmd, "--help", home=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "Usage" in r.stdout


def _tiny_llama_with_tokenizer(out: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from cloud.packaging.corpus import heldout_text
    from cloud.packaging.demo_model import train_tokenizer

    train_tokenizer(heldout_text(200_000), 300, out)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        eos_token_id=0,
        pad_token_id=0,
    )
    LlamaForCausalLM(cfg).save_pretrained(str(out))
    return out


@pytest.mark.slow
def test_package_list_show_and_refuse_duplicate(tmp_path: Path) -> None:
    src = _tiny_llama_with_tokenizer(tmp_path / "src")
    home = tmp_path / "home"
    r = autoglm(
        "model",
        "package",
        str(src),
        "--name",
        "tiny-llama",
        "--version",
        "0.1",
        "--quantize",
        "none",
        home=home,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    # A Llama gets the fused decoder.
    for step in [
        "Building the fused ONNX decoder",
        "Validating",
        "Measuring perplexity",
        "Splitting",
        "Signing",
    ]:
        assert step in r.stdout
    # On standard error: `--trust "$(autoglm model key)"` captures the key alone.
    assert "Created a new manifest signing key" in r.stderr
    assert (home / "keys" / "manifest-signing.pem").stat().st_mode & 0o777 == 0o600

    listed = json.loads(autoglm("model", "ls", "--json", home=home).stdout)
    assert [(m["name"], m["version"], m["signature"]) for m in listed] == [("tiny-llama", "0.1", "ok")]

    shown = autoglm("model", "show", "tiny-llama:0.1", home=home)
    assert shown.returncode == 0
    summary = [line for line in shown.stdout.splitlines() if line.startswith("# ")]
    assert any(line.startswith("# signature valid, by this registry's key") for line in summary), summary
    assert not shown.stderr
    assert any("perplexity on python-stdlib-heldout" in line for line in summary), summary
    assert any("perplexity on python-reference-prose" in line for line in summary), summary
    assert any(line.startswith("# pool artifact sha256:") for line in summary), summary
    # Unquantized: the float cache (2 layers x 1 KV head x 16, keys and values, 4 bytes each).
    kv = "# KV cache float32: 256 bytes per position and sequence (2 layers × 1 KV heads × 16, keys and values)"
    assert kv in summary, summary
    doc = json.loads("\n".join(line for line in shown.stdout.splitlines() if not line.startswith("# ")))
    # The weights are cut at their tensors' boundaries (as well as every MiB): a v3 manifest.
    assert doc["manifest"]["schema"] == "autoglm.manifest/v3"
    weights = [f["blob"] for f in doc["manifest"]["files"] if f["role"] == "weights"]
    assert weights and all(len(b["ends"]) == len(b["chunks"]) for b in weights)
    assert doc["manifest"]["validation"]["greedy_tokens_match"] is True
    assert {f["path"] for f in doc["manifest"]["files"]} >= {"model.onnx", "tokenizer.json", "config.json"}
    assert doc["signature"]["alg"] == "ed25519"

    again = autoglm("model", "package", str(src), "--name", "tiny-llama", "--version", "0.1", home=home)
    assert again.returncode == 1
    assert "already exists" in again.stderr

    # For a fleet of agents that predate v3 manifests: chunks every --chunk-size bytes only.
    fixed = autoglm(
        "model",
        "package",
        str(src),
        "--name",
        "tiny-llama",
        "--version",
        "0.2",
        "--quantize",
        "none",
        "--chunking",
        "fixed",
        "--no-pool-artifact",
        home=home,
    )
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    doc = json.loads(
        "\n".join(
            line
            for line in autoglm("model", "show", "tiny-llama:0.2", home=home).stdout.splitlines()
            if not line.startswith("# ")
        )
    )
    assert doc["manifest"]["schema"] == "autoglm.manifest/v2"
    assert all("ends" not in f["blob"] for f in doc["manifest"]["files"])
    bogus = autoglm(
        "model", "package", str(src), "--name", "t", "--version", "1", "--chunking", "tensor", home=home
    )
    assert bogus.returncode == 2 and "choose tensors or fixed" in bogus.stdout + bogus.stderr

    # A manifest edited after signing is listed, and named as one no device accepts.
    stored = home / "registry" / "manifests" / "tiny-llama" / "0.2.json"
    edited = json.loads(stored.read_text())
    edited["manifest"]["parameters"] += 1
    stored.write_text(json.dumps(edited))
    assert json.loads(autoglm("model", "ls", "--json", home=home).stdout)[1]["signature"] == "BAD"
    shown = autoglm("model", "show", "tiny-llama:0.2", home=home)
    assert "# signature INVALID: the manifest was changed after it was signed" in shown.stdout
    # Without the key file (a machine that only reads the registry): unchecked, not damaged.
    other = autoglm("model", "ls", "--signing-key", str(tmp_path / "other.pem"), "--json", home=home)
    assert [m["signature"] for m in json.loads(other.stdout)] == ["no key", "no key"]
    assert not (tmp_path / "other.pem").exists()  # reading the registry creates no key
    second = tmp_path / "second.pem"
    assert autoglm("model", "key", "--signing-key", str(second), home=home).returncode == 0
    other = autoglm("model", "ls", "--signing-key", str(second), "--json", home=home)
    assert [m["signature"] for m in json.loads(other.stdout)] == ["other key", "other key"]
    (tmp_path / "bad.pem").write_text("not a key")
    unread = autoglm("model", "ls", "--signing-key", str(tmp_path / "bad.pem"), "--json", home=home)
    assert unread.returncode == 0 and "Signatures not checked" in unread.stderr
    assert [m["signature"] for m in json.loads(unread.stdout)] == ["no key", "no key"]
    # A signing key any user can read: said on standard error, the command still runs.
    (home / "keys" / "manifest-signing.pem").chmod(0o644)
    loose = autoglm("model", "ls", home=home)
    assert loose.returncode == 0 and "can be read by any user (mode 0644)" in loose.stderr

    missing = autoglm("model", "show", "tiny-llama:9", home=home)
    assert missing.returncode == 1 and "model not found" in missing.stderr and not missing.stdout

    key = autoglm("model", "key", home=home).stdout.strip()
    assert len(base64.b64decode(key)) == 32


def test_pool_refuses_a_folder_that_is_not_a_model(tmp_path: Path) -> None:
    r = autoglm("pool", "serve", "--model", str(tmp_path), home=tmp_path)
    assert r.returncode == 1
    assert "not a Hugging Face model folder" in r.stdout + r.stderr


def test_bad_inputs_give_clear_errors(tmp_path: Path) -> None:
    r = autoglm("model", "package", str(tmp_path), "--name", "x", "--version", "1", home=tmp_path)
    assert r.returncode == 1 and "config.json is missing" in r.stderr
    r = autoglm("model", "package", str(tmp_path / "nope"), "--name", "x", "--version", "1", home=tmp_path)
    assert r.returncode == 2 and "neither a model folder nor a .gguf file" in r.stderr
    r = autoglm("model", "show", "no-colon", home=tmp_path)
    assert r.returncode == 2 and "NAME:VERSION" in r.stderr
    # Each a clear error, never a traceback, and nothing half-made left behind.
    folder = tmp_path / "m"
    folder.mkdir()
    llama = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1}
    llama |= {"num_attention_heads": 2, "intermediate_size": 64}
    for config, says in (
        ([1, 2], "not a JSON object"),
        ({**llama, "num_hidden_layers": -1}, "num_hidden_layers must be a positive integer"),
        ({**llama, "vocab_size": 0}, "vocab_size must be a positive integer"),
        ({**llama, "hidden_size": 1e12}, "hidden_size must be a positive integer"),
        (llama, "cannot load the model"),  # weights truncated
    ):
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
        r = autoglm("model", "package", str(folder), "--name", "x", "--version", "1", home=tmp_path)
        assert r.returncode == 1 and says in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    for option, value in (
        ("--max-ppl-increase", "nan"),
        ("--max-ppl-increase", "-1"),
        ("--eval-text", "/no"),
    ):
        r = autoglm(
            "model", "package", str(folder), "--name", "x", "--version", "1", option, value, home=tmp_path
        )
        assert r.returncode == 2 and option in r.stderr, r.stderr
    r = autoglm("model", "key", "--signing-key", str(folder), home=tmp_path)
    assert r.returncode == 1 and "cannot be read" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not list(tmp_path.glob("registry/manifests/*/*.json"))
    # A new key's notice goes to standard error: `--trust "$(autoglm model key)"` gets the key alone.
    fresh = autoglm("model", "key", home=tmp_path / "fresh")
    assert fresh.returncode == 0 and "Created a new manifest signing key" in fresh.stderr
    assert len(base64.b64decode(fresh.stdout.strip())) == 32 and len(fresh.stdout.splitlines()) == 1
    bad = tmp_path / "edge.yaml"
    bad.write_text(yaml.safe_dump({"device_id": "d", "data_dir": str(tmp_path)}))
    r = autoglm("edge", "run", "--config", str(bad), home=tmp_path)
    assert r.returncode == 2 and "trusted_keys" in r.stderr


@pytest.mark.slow
def test_manual_path_from_the_readme(tmp_path: Path, demo_source: Path, broker, tenant: str) -> None:  # type: ignore[no-untyped-def]
    """model package → model key → cloud control-key → edge run → cloud blobs → cloud assign, each
    its own process."""
    import httpx

    from cloud.plane.fleet import Fleet
    from cloud.plane.store import make_engine
    from cloud.processes import stop_process
    from shared.mqtt import BrokerSettings
    from tests.conftest import start_edge

    home = tmp_path / "home"
    registry = tmp_path / "registries" / tenant
    packaged = autoglm(
        "model", "package", str(demo_source), "--name", "manual", "--version", "1",
        "--registry", str(registry), home=home,
    )  # fmt: skip
    assert packaged.returncode == 0, packaged.stdout + packaged.stderr
    key = autoglm("model", "key", home=home).stdout.strip()
    control = autoglm("cloud", "control-key", home=home).stdout.strip().splitlines()[-1]
    addr = f"{broker.host}:{broker.port}"
    edge = start_edge(
        tmp_path,
        device_id="edge-0001",
        tenant=tenant,
        broker=BrokerSettings(host=broker.host, port=broker.port),
        trusted=[key],
        control_keys=[control],
    )
    blobs = subprocess.Popen(
        [
            *(sys.executable, "-m", "cloud.cli", "cloud", "blobs"),
            *("--broker", addr, "--tenant", tenant, "--registry", str(registry)),
        ],
        env={**os.environ, "AUTOGLM_HOME": str(home)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        config = tmp_path / "cloud.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "database_url": f"sqlite:///{tmp_path / 'cloud.db'}",
                    "registry_dir": str(registry.parent),
                    "tenants": [tenant],
                    "broker": {"host": broker.host, "port": broker.port},
                }
            )
        )
        assigned = autoglm(
            "cloud", "assign", "edge-0001", "manual:1", "-c", str(config), "--tenant", tenant, home=home
        )
        assert assigned.returncode == 0, assigned.stdout + assigned.stderr
        assert "edge-0001 → manual:1 (revision 1, signed by" in assigned.stdout
        assert edge.wait_ready()["model"] == "manual:1"
        # The revision comes from the database's counter: the next assignment is revision 2.
        again = autoglm(
            "cloud", "assign", "edge-0001", "manual:1", "-c", str(config), "--tenant", tenant, home=home
        )
        assert "(revision 2, signed by" in again.stdout, again.stdout + again.stderr
        engine = make_engine(f"sqlite:///{tmp_path / 'cloud.db'}")
        assert Fleet(engine).current_desired(tenant, "edge-0001").revision == 2  # type: ignore[union-attr]
        engine.dispose()
        r = httpx.post(
            f"{edge.api}/v1/completions",
            json={"model": "manual", "prompt": "def main():\n", "max_tokens": 8},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["choices"][0]["text"]
    finally:
        stop_process(blobs)
        edge.stop()


def test_cloud_key_refuses_a_tenant_the_config_does_not_serve(tmp_path: Path) -> None:
    config = tmp_path / "cloud.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "database_url": f"sqlite:///{tmp_path / 'cp.sqlite3'}",
                "registry_dir": str(tmp_path / "registries"),
                "tenants": ["acme"],
            }
        )
    )
    r = autoglm(
        "cloud",
        "key",
        "create",
        "--config",
        str(config),
        "--tenant",
        "evil",
        "--scope",
        "admin",
        home=tmp_path,
    )
    assert r.returncode == 2 and "'evil' is not in the config's tenants (acme)" in r.stderr
    assert not (tmp_path / "cp.sqlite3").exists()  # nothing was written
    ok = autoglm(
        "cloud",
        "key",
        "create",
        "--config",
        str(config),
        "--tenant",
        "acme",
        "--scope",
        "inference",
        home=tmp_path,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.strip().splitlines()[-1].startswith("agk_")


def test_keys_are_listed_expire_and_are_revoked(tmp_path: Path) -> None:
    """Item 12: the key lifecycle from the CLI, and what the database then accepts."""
    from cloud.plane.auth import ApiKeys
    from cloud.plane.store import make_engine

    db = tmp_path / "cp.sqlite3"
    config = tmp_path / "cloud.yaml"
    config.write_text(yaml.safe_dump({"database_url": f"sqlite:///{db}", "registry_dir": str(tmp_path)}))
    made = autoglm(
        "cloud",
        "key",
        "create",
        "--config",
        str(config),
        "--name",
        "ci",
        "--expires-in",
        "3600",
        home=tmp_path,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    key = made.stdout.strip().splitlines()[-1]
    key_id = key.split("_")[1]
    keys = ApiKeys(make_engine(f"sqlite:///{db}"))
    assert keys.verify(key) is not None
    listed = autoglm("cloud", "key", "ls", "--config", str(config), "--json", home=tmp_path)
    [row] = json.loads(listed.stdout)
    assert (row["key_id"], row["name"], row["revoked"], row["expired"]) == (key_id, "ci", False, False)
    assert row["expires_at"] is not None and "secret" not in listed.stdout and key not in listed.stdout
    bad = autoglm("cloud", "key", "create", "--config", str(config), "--expires-in", "-5", home=tmp_path)
    assert bad.returncode == 1 and "expires_in_s" in bad.stderr
    revoked = autoglm("cloud", "key", "revoke", key_id, "--config", str(config), home=tmp_path)
    assert revoked.returncode == 0 and keys.verify(key) is None
    assert autoglm("cloud", "key", "revoke", "nope", "--config", str(config), home=tmp_path).returncode == 1
    # An expired key stops working without anyone revoking it.
    _, short = keys.create("default", "short", "operator", expires_in_s=1)  # the shortest lifetime
    assert keys.verify(short) is not None
    time.sleep(1.2)
    assert keys.verify(short) is None
