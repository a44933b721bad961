"""Head mode's frozen pass: what the heads read for each image, computed by the fastest engine
that gives PyTorch's answer.

The backbone is frozen, so its pass is inference, and ONNX Runtime runs inference on a CPU several
times faster than eager PyTorch (EfficientNet-Lite0 at 224 px on two cores: about 7x, see
``benchmarks/results/finetune-speed.md``). On a CPU device the backbone up to the heads' inputs is
exported once (TorchScript's exporter: about 2 s for Lite0 where the dynamo exporter takes 15; the
graph never leaves this process and is checked below) and run by ONNX Runtime, batch after batch,
while a thread decodes and resizes the next batch.

The engine is trusted only after it gives PyTorch's features on the run's own first batch, within
``TOLERANCE`` of the features' scale (on its first ``SAMPLE`` images); otherwise, or when the backbone will not export, the pass
stays in PyTorch (channels-last, which is faster for the depthwise convolutions of the edge
families) with a one-line note. With ``auto``, a pass over fewer than ``WORTH_PIXELS`` pixels stays
in PyTorch too: the export would cost more than it saves (a fixed rule, not a timing, so that the
same run always takes the same path). The engine's name goes into the feature
cache's key, so features of one engine are never read as another's.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import queue
import sys
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.markup import escape
from torch import nn

from ..config import FeatureEngine
from ..errors import first_line
from ..models import BuiltModel
from ..progress import console
from ..runtime.sessions import open_session

__all__ = ["SAMPLE", "TOLERANCE", "WORTH_PIXELS", "FeatureTap", "FrozenPass", "channels_last", "prefetch"]

TOLERANCE = 1e-3  # largest difference from PyTorch's features, as a fraction of their largest magnitude
SAMPLE = 8  # images of the first batch run by both engines before the engine is trusted
WORTH_PIXELS = 4_000_000  # auto: a pass over fewer pixels (1,000 images at 64 px, 80 at 224) is not worth an export
INPUT, OUTPUT = "images", "features"


class FeatureTap(nn.Module):
    """The model up to its heads: what each head receives, side by side (the heads still run, so a
    model that mixes its heads' outputs traces as it runs)."""

    def __init__(self, module: nn.Module, heads: Sequence[nn.Module]) -> None:
        super().__init__()
        self.module, self.heads = module, heads
        self.widths: list[int] = []  # each head's input width, from the last eager call

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        captured, logits = self.forward_with_logits(x)
        del logits
        return captured

    def forward_with_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        hooks = [head.register_forward_pre_hook(lambda m, args: captured.append(args[0].float())) for head in self.heads]
        try:
            logits = self.module(x)
        finally:
            for hook in hooks:
                hook.remove()
        self.widths = [int(c.shape[1]) for c in captured]
        return torch.cat(captured, dim=1), logits


@dataclass
class FrozenPass:
    """Runs the frozen backbone over batches with the chosen engine; ``engine`` is decided by the
    first batch (``auto``) and kept for every later pass of the run.

    ``check_logits`` is called once with the first batch's tapped features and PyTorch's logits
    (head mode refuses a model whose logits are not its heads' output on those features)."""

    built: BuiltModel
    device: torch.device
    wanted: FeatureEngine = FeatureEngine.AUTO
    threads: int | None = None
    check_logits: Callable[[torch.Tensor, torch.Tensor], None] | None = None
    engine: str | None = None
    note: str | None = None
    max_difference: float | None = None
    _session: Any = field(default=None, repr=False)
    widths: list[int] = field(default_factory=list)  # each head's input width, known after the first batch

    def run(
        self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], total: int, advance: Callable[[int], None]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Features and labels of every batch; ``total``: the images of the whole pass (on every
        rank of a distributed job), which decides whether an export pays."""
        features, labels = [], []
        tap = FeatureTap(self.built.module, self.built.heads).eval()
        faster_layout = self.device.type == "cpu"
        with contextlib.ExitStack() as formats:
            if self.engine == "torch" and faster_layout:
                formats.enter_context(channels_last(tap.module))
            for x, y in prefetch(batches):
                if self.engine is None:  # a sample of the first batch decides, in the model's own format (what is exported)
                    out = self._first(tap, x, total)
                    if self._session is None and faster_layout:
                        formats.enter_context(channels_last(tap.module))  # the later batches, in PyTorch's faster CPU layout
                else:
                    out = self._eager(tap, x, layout=faster_layout) if self._session is None else self._engine(x)
                features.append(out)
                labels.append(y)
                advance(len(y))
        if not features:
            return torch.empty(0, sum(self.widths)), torch.empty(0, dtype=torch.long)  # an empty split: never trained on
        return torch.cat(features), torch.cat(labels)

    def _first(self, tap: FeatureTap, x: torch.Tensor, total: int) -> torch.Tensor:
        """The first batch's features, after choosing the engine on its first ``SAMPLE`` images."""
        eager, logits = self._eager(tap, x[:SAMPLE], with_logits=True)
        self.widths = tap.widths
        if self.check_logits is not None:
            self.check_logits(eager, logits)
        self._choose(tap, x[:SAMPLE], eager, total * x.shape[-2] * x.shape[-1])
        if self._session is not None:
            return self._engine(x)
        return torch.cat([eager, self._eager(tap, x[SAMPLE:])]) if len(x) > SAMPLE else eager

    def forget(self) -> None:
        """The backbone changed (BatchNorm adapted): the exported graph no longer matches it."""
        self._session, self.engine = None, None

    def record(self) -> dict[str, Any]:
        return {"engine": self.engine, "asked": self.wanted.value, "note": self.note, "max_difference": self.max_difference}

    def _eager(self, tap: FeatureTap, x: torch.Tensor, with_logits: bool = False, layout: bool = False):
        x = x.to(self.device, non_blocking=True)
        if layout:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            features, logits = tap.forward_with_logits(x)
        return (features.cpu(), logits.float().cpu()) if with_logits else features.cpu()

    def _engine(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self._session.run([OUTPUT], {INPUT: x.numpy()})[0])

    def _choose(self, tap: FeatureTap, x: torch.Tensor, eager: torch.Tensor, pixels: int) -> None:
        """Decide the engine on the first batch: ONNX Runtime when asked or when it pays, if it
        exports and gives PyTorch's features; else PyTorch, with the reason."""
        self.engine = "torch"
        if self.wanted is FeatureEngine.TORCH:
            return
        reason = self._unusable(pixels)
        if reason is not None and self.wanted is FeatureEngine.AUTO:
            return  # auto's own choice (another device, a short pass): nothing to note
        if reason is None:
            try:
                self._session = self._export(tap, x)
            except Exception as exc:  # any exporter or loader failure: the pass still works in PyTorch
                reason = f"the backbone did not export ({first_line(exc)})"
        if reason is None:
            got = self._engine(x)
            scale = max(1.0, float(eager.abs().max()))
            self.max_difference = float((got - eager).abs().max()) / scale if got.shape == eager.shape else float("inf")
            if not self.max_difference <= TOLERANCE:  # NaN too
                reason = f"ONNX Runtime's features differ from PyTorch's by {self.max_difference:.2g} of their scale (tolerance {TOLERANCE:g})"
        if reason is None:
            self.engine = "onnxruntime"
            return
        self._session = None
        self.note = reason
        console.print("[yellow]note:[/]", escape(f"frozen features computed by PyTorch: {reason}"))

    def _unusable(self, pixels: int) -> str | None:
        if self.device.type != "cpu":
            return f"the run is on {self.device.type}, where PyTorch runs the backbone"
        if self.wanted is FeatureEngine.AUTO and pixels < WORTH_PIXELS:
            return f"not worth an export ({pixels / 1e6:.1f} M pixels to pass, fewer than {WORTH_PIXELS / 1e6:g} M)"
        return None

    def _export(self, tap: FeatureTap, x: torch.Tensor):
        with tempfile.TemporaryDirectory(prefix="edgetransfer-features-") as folder, warnings.catch_warnings(), torch.no_grad(), silent_stdout():
            path = f"{folder}/backbone.onnx"
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
            torch.onnx.export(
                tap,
                (x[:2].contiguous(),),
                path,
                dynamo=False,
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
                opset_version=17,
            )
            return open_session(path, threads=self.threads or torch.get_num_threads())


class channels_last:
    """Context: ``module`` in channels-last memory format while inside (when ``enabled``), and
    back in the default format after, so that what is saved or exported is as before."""

    def __init__(self, module: nn.Module, enabled: bool = True) -> None:
        self.module, self.enabled = module, enabled

    def __enter__(self) -> nn.Module:
        if self.enabled:
            self.module.to(memory_format=torch.channels_last)
        return self.module

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.module.to(memory_format=torch.contiguous_format)


@contextlib.contextmanager
def silent_stdout() -> Iterator[None]:
    """File descriptor 1 to the null device while inside: the TorchScript exporter prints the
    whole graph there from C++ when a conversion fails (what failed is said in one line instead)."""
    fd = 1  # the process's own standard output, where C++ writes (sys.stdout may be another stream)
    if sys.stdout is not None:
        sys.stdout.flush()
    try:
        saved = os.dup(fd)
    except OSError:  # no standard output at all: nothing to silence
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), fd)
        yield
    finally:
        if sys.stdout is not None:  # what Python, C and C++ buffered goes to the null device, not to the terminal later
            sys.stdout.flush()
        _flush_c_stdio()
        os.dup2(saved, fd)
        os.close(saved)


def _flush_c_stdio() -> None:
    try:
        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError, TypeError):  # no C library to load by that name (Windows): nothing buffered to flush
        pass


_DONE = object()


def prefetch(items: Iterable, depth: int = 2) -> Iterator:
    """``items`` produced by a background thread up to ``depth`` ahead: decoding and resizing the
    next batch (Pillow and torch release the GIL) while the current one runs. An error in the
    thread is raised here; leaving the loop early stops the thread."""
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        buffer.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            buffer.put((_DONE, None))
        except BaseException as exc:  # handed to the consumer, which raises it
            buffer.put((_DONE, exc))

    worker = threading.Thread(target=produce, name="edgetransfer-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = buffer.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        while worker.is_alive():
            try:
                buffer.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.05)
