"""benchmarks/profile_table.py: kernel names, categories, the busy-time union, the summary and its Markdown, and
a real torch.profiler run of a small training step on the CPU."""

from __future__ import annotations

import pytest
import torch

from bench_scripts import load

pt = load("profile_table")

FILL = ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>, "
        "at::detail::Array<char*, 1> >(int, at::native::FillFunctor<float>, at::detail::Array<char*, 1>)")
COPY = ("void at::native::elementwise_kernel<128, 2, at::native::gpu_kernel_impl_nocast<at::native::"
        "direct_copy_kernel_cuda(at::TensorIteratorBase&)::{lambda()#3}::operator()() const::{lambda(c10::BFloat16)#1}>"
        "(at::TensorIteratorBase&)::{lambda(int)#1}>(int, at::native::gpu_kernel_impl_nocast<...>)")
XMMA = ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1_execute_segment_k_off_kernel"
        "__5x_cublas")
FLASH = ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4, false, false, "
         "cutlass::bfloat16_t, Flash_kernel_traits<128, 128, 64, 4, cutlass::bfloat16_t> >, false, true>"
         "(pytorch_flash::Flash_fwd_params)")
DEQUANT = ("void kDequantizeBlockwise<__nv_bfloat16, 512, 64, 8, 2>(float*, unsigned char*, float*, __nv_bfloat16*, "
           "int, int)")
ADAM = ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<at::native::(anonymous namespace)::"
        "TensorListMetadata<4>, at::native::(anonymous namespace)::FusedAdamMathFunctor<float, 4, "
        "(at::native::ADAM_MODE)1, false>, float*, double>(at::native::(anonymous namespace)::TensorListMetadata<4>)")


@pytest.mark.parametrize("raw, short", [
    (FILL, "vectorized_elementwise_kernel<FillFunctor>"),
    (COPY, "elementwise_kernel<direct_copy_kernel_cuda>"),
    (FLASH, "flash_fwd_kernel"),
    (DEQUANT, "kDequantizeBlockwise"),
    (ADAM, "multi_tensor_apply_kernel<FusedAdamMathFunctor>"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT"),
    ("Memcpy HtoD (Pinned -> Device)", "Memcpy HtoD (Pinned -> Device)"),
    ("aten::addmm", "aten::addmm"),
    ("_rms_norm_fwd_kernel", "_rms_norm_fwd_kernel"),
])
def test_short_names_drop_signatures_and_namespaces(raw, short):
    assert pt.short_name(raw) == short


def test_long_names_are_cut_to_the_width():
    name = pt.short_name(XMMA)
    assert len(name) == pt.NAME_WIDTH and name.startswith("sm90_xmma_gemm_bf16bf16") and name.endswith("...")


def test_categories():
    ours = pt.slothbook_kernel_names()
    expect = {FILL: "aten", COPY: "aten", ADAM: "aten", XMMA: "matmul", FLASH: "attention", DEQUANT: "nf4_dequant",
              "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT": "matmul",
              "fmha_cutlassF_bf16_aligned_64x128_rf_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::bfloat16_t, "
              "cutlass::arch::Sm80, true, 64, 128, 128, true, true>::Params)": "attention",
              "Memcpy DtoH (Device -> Pinned)": "memcpy", "_dequantize_nf4_kernel": "nf4_dequant",
              "_rms_norm_fwd_kernel": "slothbook_triton", "_rms_norm_forward_kernel": "other_triton",
              "triton_poi_fused_add_0": "other_triton", "aten::mm": "matmul", "aten::mul": "aten",
              "ncclDevKernel_AllReduce": "other"}
    assert {raw: pt.category(raw, ours) for raw in expect} == expect
    # Another library's kernel named like ours is not ours; on the CPU a bare _Name is an autograd Function.
    assert pt.category("_rms_norm_fwd_kernel") == "other_triton"
    assert pt.category("_LoRAMLP", ours, source="cpu") == "other"


def test_slothbook_kernel_names_come_from_kernels_sources():
    names = pt.slothbook_kernel_names()
    assert {"_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_rope_kernel", "_glu_fwd_kernel", "_glu_bwd_kernel",
            "_cross_entropy_kernel", "_dequantize_nf4_kernel"} <= names


def test_busy_time_is_the_union_of_overlapping_kernels():
    assert pt.busy_us([(0, 10), (5, 12), (20, 25), (21, 22)]) == 17
    assert pt.busy_us([]) == 0


def test_summary_per_step_sorted_and_split_by_category():
    records = [(XMMA, 300.0), (XMMA, 500.0), (FILL, 50.0), (FLASH, 100.0), (FLASH, 150.0), (DEQUANT, 100.0)] * 2
    p = pt.summarize(records, steps=2, wall_ms=2.0, busy=3000.0, source="cuda", top=3)
    assert p["device_ms"] == 1.2 and p["busy_ms"] == 1.5 and p["busy_fraction"] == 0.75 and p["kernel_names"] == 4
    assert [k["name"] for k in p["kernels"]] == [pt.short_name(XMMA), "flash_fwd_kernel", "kDequantizeBlockwise"]
    gemm = p["kernels"][0]
    assert gemm["calls"] == 2 and gemm["ms"] == 0.8 and gemm["share"] == round(800 / 1200, 4)
    assert list(p["categories"]) == list(pt.CATEGORIES)
    assert p["categories"]["aten"] == 0.05  # split over every kernel, not only the top 3
    assert abs(sum(p["categories"].values()) - p["device_ms"]) < 1e-9


def test_markdown_has_the_overview_and_each_profile():
    p = pt.summarize([(XMMA, 800.0), (FILL, 200.0)], steps=1, wall_ms=2.0, busy=1000.0, source="cuda")
    text = pt.markdown([dict(p, contender="slothbook", config="qlora 2048x4 llama-3.1-8b", timed_ms=1.5),
                        dict(p, contender="hf", config="qlora 2048x4 llama-3.1-8b")])
    lines = text.splitlines()
    assert lines[0].startswith("| config | contender | step ms | profiled ms | busy ms | busy | kernel ms | matmul |")
    assert "| qlora 2048x4 llama-3.1-8b | slothbook | 1.5 | 2.0 | 1.0 | 50% | 1.0 | 0.8 | 0.0 |" in text
    assert "| qlora 2048x4 llama-3.1-8b | hf | - | 2.0 | 1.0 | 50% | 1.0 | 0.8 | 0.0 |" in text  # not timed
    assert lines.index("#### hf, qlora 2048x4 llama-3.1-8b") < lines.index("#### slothbook, qlora 2048x4 llama-3.1-8b")
    assert "| `vectorized_elementwise_kernel<FillFunctor>` | aten | 1 | 0.20 | 20.0% |" in text
    assert pt.markdown([]) == ""


def test_host_api_calls_per_step_by_time():
    records = [("cudaLaunchKernel", 5.0)] * 40 + [("cudaFree", 900.0), ("cudaMalloc", 300.0)] * 2
    calls = pt.host_api(records, steps=2, top=2)
    assert calls == [{"name": "cudaFree", "calls": 1.0, "ms": 0.9}, {"name": "cudaMalloc", "calls": 1.0, "ms": 0.3}]
    assert pt.host_api(records, steps=2)[-1] == {"name": "cudaLaunchKernel", "calls": 20.0, "ms": 0.1}
    assert pt._CUDA_API.match("cuLaunchKernelEx") and pt._CUDA_API.match("cudaStreamSynchronize")
    assert not pt._CUDA_API.match("cudnn_generated_fort_native_sdpa") and not pt._CUDA_API.match("cutlass_80_gemm")
    p = dict(pt.summarize([(XMMA, 800.0)], steps=1, wall_ms=2.0, busy=800.0, source="cuda"), host_api=calls,
             contender="slothbook", config="qlora 2048x1")
    assert "CUDA API calls on the host per step: `cudaFree` 1 calls 0.9 ms, `cudaMalloc` 1 calls 0.3 ms." in (
        pt.kernel_table(p))


def test_profile_of_a_real_cpu_training_step():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 32))
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(16, 32)
    calls = []

    def step():
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        calls.append(1)

    p = pt.profile_steps(step, torch.device("cpu"), steps=2, top=5)
    assert len(calls) == 2 and p["source"] == "cpu" and p["steps"] == 2  # no warm-up call on the CPU
    assert 0 < p["busy_ms"] <= p["wall_ms"] and 0 < p["busy_fraction"] <= 1
    assert len(p["kernels"]) == 5 and all(k["calls"] > 0 for k in p["kernels"])
    assert [k["ms"] for k in p["kernels"]] == sorted((k["ms"] for k in p["kernels"]), reverse=True)
    assert p["categories"]["matmul"] > 0  # addmm forward, mm backward
    assert p["host_api"] == []  # CUDA calls only
    assert not any(k["name"].startswith("ProfilerStep") or "Optimizer.step" in k["name"] for k in p["kernels"])
