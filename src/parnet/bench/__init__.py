"""``parnet bench``: batch-1 latency and large-batch throughput, ParNet against deep baselines.

Every (model, mode) pair is timed in the same run, interleaved: each repetition calls every pair
once, in a rotating order, so that load from other processes falls on all of them alike. The
first calls of each pair (``--warmup``; they include torch.compile's compilation) are not timed.
Each pair's output is checked against its plain model's eval output (max absolute difference,
recorded) before it is timed.

ParNet variants run in training form (``train``: unfused, eval), ``fused`` and every deploy mode
of the device; the baselines (by default timm's ResNet-34, ResNet-50 and RepVGG-B1g4; B2g4 on request; RepVGG
re-parameterized) run ``eager``, ``channels_last``, ``packed`` and ``winograd`` (ParNet's modes in
their generic form, ``pack_convs`` of :mod:`parnet.deployment`, BNs folded first), ``frozen`` (TorchScript
frozen and optimized for inference: PyTorch's generic oneDNN path) and ``compiled``
(channels_last + torch.compile): the same modes ParNet gets; on CUDA also ``cuda_graph``. A model's modes
follow the list it is given in: ``--models`` get ``--modes`` (another network than a ParNet there, the
baselines' modes), ``--baselines`` get ``--baseline-modes``, ParNets among them too; ``auto`` is timed as
``deploy`` chooses it, the choice recorded.
"""

from .machine import (
    PEAK_SIZE,
    SIMD_FLAGS,
    code_version,
    engine_versions,
    machine_info,
    machine_peak,
    model_gflop,
    onednn_version,
)
from .report import (
    LATENCY_TARGET,
    THROUGHPUT_TARGET,
    best,
    check_targets,
    format_header,
    format_markdown,
    mode_label,
    plot_results,
    targets_skipped,
)
from .run import (
    BASELINE_CPU_MODES,
    BASELINE_CUDA_MODES,
    BASELINE_SKIPS,
    CPU_EXTRA_MODES,
    CUDA_EXTRA_MODES,
    PAPER,
    PARNET_CPU_MODES,
    PARNET_CUDA_MODES,
    SETTLE_S,
    Record,
    bench_files,
    build_entries,
    calibration_noise,
    check_model_modes,
    check_modes,
    default_modes,
    randomize_statistics,
    run_bench,
    split_mode,
    time_interleaved,
    uses_parnet_modes,
    valid_modes,
)

__all__ = [
    "BASELINE_CPU_MODES", "BASELINE_CUDA_MODES", "BASELINE_SKIPS", "CPU_EXTRA_MODES", "CUDA_EXTRA_MODES",
    "LATENCY_TARGET", "PAPER", "PARNET_CPU_MODES", "PARNET_CUDA_MODES", "PEAK_SIZE", "SETTLE_S", "SIMD_FLAGS",
    "THROUGHPUT_TARGET", "Record", "bench_files", "best", "build_entries", "calibration_noise",
    "check_model_modes", "check_modes", "check_targets", "code_version", "default_modes", "engine_versions",
    "format_header", "format_markdown", "machine_info", "machine_peak", "mode_label", "model_gflop",
    "onednn_version", "plot_results", "randomize_statistics", "run_bench", "split_mode", "targets_skipped",
    "time_interleaved", "uses_parnet_modes", "valid_modes",
]  # fmt: skip
