from __future__ import annotations

from pathlib import Path

import numpy as np

from ..runtime import probe_provider
from ..runtime.sessions import open_session
from .base import Runner, SkipVariant

__all__ = ["OrtRunner", "InTurnRunner"]


class OrtRunner(Runner):
    """An ONNX model in ONNX Runtime on one provider, with explicit threads and no spinning."""

    def __init__(self, model: Path, provider: str = "CPUExecutionProvider", threads: int | None = None) -> None:
        super().__init__(model)
        self.model, self.wanted, self.threads = model, provider, threads

    def activate(self) -> None:

        if self.wanted != "CPUExecutionProvider":
            problem = probe_provider(self.wanted)
            if problem:
                raise SkipVariant(problem)
        providers = [self.wanted] + ([] if self.wanted == "CPUExecutionProvider" else ["CPUExecutionProvider"])
        self.session = open_session(self.model, providers, self.threads)
        self.provider = self.session.get_providers()[0]
        if self.provider != self.wanted:
            raise SkipVariant(f"asked for {self.wanted}, the session got {self.provider}")
        self.checkpoint_sha256 = self.session.get_modelmeta().custom_metadata_map.get("checkpoint_sha256", "")
        self.settings = {
            "intra_op_num_threads": str(self.threads or "default"),
            "inter_op_num_threads": "1" if self.threads else "default",
            "allow_spinning": "0",
        }
        first = self.session.get_inputs()[0]
        self.input_name = first.name
        self.input_format = "uint8-nhwc" if "uint8" in first.type else "float32-nchw-normalized"

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch})[0]

    def deactivate(self) -> None:
        self.session = None


class InTurnRunner(Runner):
    """Several single-task ONNX models run one after the other on the same batch, their logits
    side by side: what a device without multi-task heads runs in place of one multi-task model."""

    def __init__(self, models: list[Path], threads: int | None = None) -> None:
        super().__init__(" + ".join(str(m) for m in models))
        self.runners = [OrtRunner(model, threads=threads) for model in models]

    def activate(self) -> None:
        for runner in self.runners:
            runner.activate()
        self.provider = self.runners[0].provider
        self.input_format = self.runners[0].input_format
        self.settings = {**self.runners[0].settings, "models": str(len(self.runners)), "run": "in turn"}

    def infer(self, batch: np.ndarray) -> np.ndarray:
        return np.concatenate([runner.infer(batch) for runner in self.runners], axis=1)

    def deactivate(self) -> None:
        for runner in self.runners:
            runner.deactivate()
