"""The LoRA adapter as it travels from the learner to every rollout and teacher replica.

One ``ray.put`` of an :class:`AdapterPayload` per version; each replica materialises the files in its own
local folder (no shared filesystem assumed) and answers with an :class:`AdapterAck` that echoes the version
and the checksum *it computed from the bytes it loaded*. The controller compares every ack with the learner's
checksum: a replica that does not confirm fails the step.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["AdapterAck", "AdapterPayload", "checksum_files"]

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def checksum_files(files: dict[str, bytes]) -> str:
    """sha256 over (name, length, bytes) of every file in name order."""
    digest = hashlib.sha256()
    for name in sorted(files):
        data = files[name]
        digest.update(name.encode())
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


class AdapterPayload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ge=0, description="Policy version; 0 is the first adapter the learner exported.")
    files: dict[str, bytes] = Field(description="PEFT adapter folder contents, by file name.")
    checksum: str = Field(description="checksum_files(files), computed by the sender.")

    @model_validator(mode="after")
    def _complete_and_consistent(self) -> AdapterPayload:
        missing = [name for name in ADAPTER_FILES if name not in self.files]
        if missing:
            raise ValueError(f"adapter version {self.version} lacks {', '.join(missing)}")
        actual = checksum_files(self.files)
        if actual != self.checksum:
            raise ValueError(
                f"adapter version {self.version}: checksum {self.checksum[:12]}… ≠ bytes {actual[:12]}…"
            )
        return self

    @classmethod
    def from_dir(cls, version: int, folder: str | Path) -> AdapterPayload:
        folder = Path(folder)
        files = {name: (folder / name).read_bytes() for name in ADAPTER_FILES}
        return cls(version=version, files=files, checksum=checksum_files(files))

    def write_to(self, folder: str | Path) -> Path:
        """Write the files into ``folder`` (created) and return it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (folder / name).write_bytes(data)
        return folder


class AdapterAck(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    replica: str
    version: int
    checksum: str
