"""The GPUs this project knows, each once: the planner's model of a GPU (peaks, links, memory,
measured efficiencies) and the peaks MFU logging divides by (pretrain/metrics.py). Torch-free, so
the command line can check `--gpu` before torch loads."""

from __future__ import annotations

import dataclasses

from common.errors import UserError


@dataclasses.dataclass(frozen=True)
class Gpu:
    """One GPU model, as the planner assumes it (docs/planner.md, "Constants"): vendor datasheet
    peaks (dense, no sparsity) and links, and two measured efficiencies."""

    name: str
    bf16_tflops: float  # dense bf16 tensor-core peak
    tf32_tflops: float
    nvlink_gbs: float  # NVLink bandwidth per GPU per direction, GB/s
    network_gbs: float  # scale-out network per GPU (one NIC per GPU), GB/s
    hbm_gbs: float  # memory bandwidth, GB/s: the roofline's slope, and the memory-bound elementwise work
    fp8_tflops: float = 0.0  # dense fp8 tensor-core peak; 0 = no fp8 tensor cores (A100)
    # fraction of peak a large GEMM reaches (the "maximum achievable matmul FLOPS" measured with
    # cuBLAS, docs/planner.md); smaller GEMMs are bounded by the roofline below it
    matmul_efficiency: float = 0.801
    fp8_matmul_efficiency: float = 0.734  # the same for fp8 GEMMs
    attention_efficiency: float = 0.5  # fused (flash/cuDNN) attention, forward and backward, of the bf16 peak
    gpus_per_node: int = 8  # the NVLink domain: GPUs whose traffic never leaves NVLink
    sms: int = 132  # streaming multiprocessors: one output tile each per wave (wave quantization)
    # the total PyTorch can allocate from (cudaMemGetInfo's, the "total capacity" of its OOM message), the
    # low end of what drivers report: H100 80GB 79.10-79.18 GiB (nvidia-smi's 81,559 MiB = 79.65 GiB counts
    # memory the driver keeps for itself); --dry-run --gpu's default. docs/planner.md lists the sources
    memory_gib: float = 79.1
    # host link per GPU per direction, GB/s, for optimizer.cpu_offload's copies: about 80 % of PCIe
    # 5.0 x16's 64 GB/s (HGX H100/H200/B200); PCIe 4.0 on A100, NVLink-C2C to Grace on GB200. Assumed
    host_link_gbs: float = 50.0

    def peak(self, precision: str) -> float:
        return (self.bf16_tflops if precision != "fp32" else self.tf32_tflops) * 1e12

    def fp8_peak(self) -> float:
        """The dense FP8 peak in FLOP/s; refuses (one line) a GPU without FP8 tensor cores, never
        scoring an FP8 recipe at its bf16 peak."""
        if not self.fp8_tflops:
            with_fp8 = " | ".join(name for name, gpu in GPUS.items() if gpu.fp8_tflops)
            raise UserError(
                f"fp8.enabled = true: {self.name} has no FP8 tensor cores; set fp8.enabled = false "
                f"or plan for --gpu {with_fp8}"
            )
        return self.fp8_tflops * 1e12

    def bandwidth(self, span: int) -> float:
        """Bytes/s of a group spanning `span` consecutive ranks: NVLink inside a domain, else the network."""
        return (self.nvlink_gbs if span <= self.gpus_per_node else self.network_gbs) * 1e9


GPUS = {
    # A100 SXM 80GB: 312 TFLOPS bf16, NVLink 3 (600 GB/s both directions), HDR 200 Gb/s, 2.0 TB/s HBM2e
    "a100": Gpu(
        "a100", 312.0, 156.0, 300.0, 25.0, 2039.0, matmul_efficiency=0.859, sms=108, memory_gib=79.1, host_link_gbs=25.0
    ),
    # H100 SXM: 989 TFLOPS bf16, 1979 fp8, NVLink 4 (900 GB/s both directions), ConnectX-7 400 Gb/s, 3.35 TB/s
    "h100": Gpu("h100", 989.0, 494.0, 450.0, 50.0, 3350.0, 1979.0),
    # H200 SXM: H100's compute and links, 141 GB of HBM3e at 4.8 TB/s
    "h200": Gpu("h200", 989.0, 494.0, 450.0, 50.0, 4800.0, 1979.0, memory_gib=139.7),
    # B200 (HGX): 2.25 PFLOPS bf16 dense, 4.5 fp8, NVLink 5 (1.8 TB/s both directions), ConnectX-8 800 Gb/s, 8 TB/s
    "b200": Gpu("b200", 2250.0, 1125.0, 900.0, 100.0, 8000.0, 4500.0, 0.776, 0.763, sms=148, memory_gib=178.3),
    # GB200 NVL72: 2.5 PFLOPS bf16 dense, 5 fp8 per GPU, one NVLink 5 domain of 72 GPUs, 8 TB/s
    "gb200": Gpu(
        "gb200",
        2500.0,
        1250.0,
        900.0,
        100.0,
        8000.0,
        5000.0,
        0.776,
        0.763,
        gpus_per_node=72,
        sms=148,
        memory_gib=178.3,  # assumed: B200's (the same 192 GB of HBM3e); not seen reported
        host_link_gbs=450.0,
    ),
}

# PCIe cards MFU logging recognizes that the planner does not lay out (no NVLink domain, so no
# `--gpu` choice): their dense bf16 and fp8 peaks in TFLOP/s (datasheets, without sparsity; the
# A10G has no fp8 tensor cores).
PEAKS_ONLY = {"l40s": (362.0, 733.0), "a10g": (125.0, 0.0)}


def device_peak_tflops(device_name: str | None, fp8: bool = False) -> float | None:
    """The dense bf16 (or fp8) peak in TFLOP/s of a GPU by torch.cuda.get_device_name() (its key as a
    substring, longest key first so that GB200 is not taken for B200); None for a CPU, an unknown
    device, or fp8 on a GPU without fp8 tensor cores."""
    if not device_name:
        return None
    peaks = {key: (gpu.bf16_tflops, gpu.fp8_tflops) for key, gpu in GPUS.items()} | PEAKS_ONLY
    for key in sorted(peaks, key=len, reverse=True):
        if key.upper() in device_name.upper():
            peak = peaks[key][1 if fp8 else 0]
            return peak or None
    return None
