"""upstream/patch.py: a Patch puts back exactly what it replaced (the target's own attribute, an
inherited one, a missing one, a staticmethod), is applied once, only where needed; every upstream
change is a Patch with a named site test."""

import ast
import pathlib

from tests.helpers.runs import REPO
from upstream.patch import Patch, PatchSet


class Base:
    def inherited(self) -> str:
        return "base"


class Target(Base):
    def own(self) -> str:
        return "own"

    @staticmethod
    def static(x: int) -> int:
        return x


def test_own_inherited_missing_and_static_attributes_come_back():
    own = vars(Target)["own"]
    patches = [
        Patch("own", "-", Target, "own", lambda self: "patched"),
        Patch("inherited", "-", Target, "inherited", lambda self: "patched"),
        Patch("missing", "-", Target, "missing", None),
        Patch("static", "-", Target, "static", wrap=lambda original: staticmethod(lambda x: original(x) + 1)),
    ]
    for patch in patches:
        assert patch.apply() and not patch.apply()  # once
    assert (Target().own(), Target().inherited(), Target.missing, Target.static(1)) == ("patched", "patched", None, 2)
    for patch in reversed(patches):
        patch.revert()
    assert vars(Target)["own"] is own and "inherited" not in vars(Target) and not hasattr(Target, "missing")
    assert isinstance(vars(Target)["static"], staticmethod) and Target().static(1) == 1
    assert (Target().own(), Target().inherited()) == ("own", "base")


def test_a_patch_not_needed_changes_nothing():
    patch = Patch("own", "-", Target, "own", None, needed=lambda: False)
    assert not patch.apply() and not patch.applied and Target().own() == "own"
    patch.revert()  # nothing to put back
    assert Target().own() == "own"


def test_a_patch_set_applies_skips_lists_and_reverts():
    built = []
    patches = PatchSet(lambda: built.append(1) or [Patch(n, "-", Target, n, n) for n in ("a", "b")])
    assert built == []  # built on first use: importing a module of patches imports nothing
    assert patches.names() == ["a", "b"] and patches.apply(skip=("b",)) == ["a"]
    assert patches.apply() == ["b"] and patches.apply() == [] and (Target.a, Target.b) == ("a", "b")
    assert patches.get("b").applied
    patches.revert()
    assert not hasattr(Target, "a") and not hasattr(Target, "b") and built == [1]


# The test that shows each fix's upstream site failing without it (the CPU layer's are in
# tests/unit/test_upstream_cpu.py: SITES). Two need a multi-rank run to show: at ep2-tp2 the aux-loss
# scale is off by 4e-3 in grad norm; a fully_reshardable distributed-optimizer resume fails with
# KeyError: 'step'.
SITE_TESTS = {
    "moe_utils.te_general_gemm": "unit/test_moe.py::test_upstream_te_general_gemm_name_error_is_fixed",
    "multi_latent_attention.HAVE_TE": "unit/test_mla.py::test_upstream_mla_have_te_is_fixed",
    "MoEAuxLossAutoScaler.set_loss_scale": "e2e/test_moe_training.py::test_moe_layout_reproduces_single_process",
    "CheckpointWithoutOutput.__init__": (
        "unit/test_recompute.py::test_output_discarding_checkpoint_without_transformer_engine_is_fixed"
    ),
    "DistributedOptimizer._set_main_param_and_optimizer_states": (
        "e2e/test_checkpoint.py::test_resume_at_another_layout_continues_the_curve"
    ),
    "TorchFullyShardedDataParallel.finish_grad_sync": (
        "distributed/test_fsdp.py::test_fsdp_gradients_equal_single_process_and_each_fix_is_needed"
    ),
    "TorchFullyShardedDataParallel.scale_gradients": (
        "distributed/test_fsdp.py::test_fsdp_gradients_equal_single_process_and_each_fix_is_needed"
    ),
    "TorchFullyShardedDataParallel.__init__": (
        "distributed/test_fsdp.py::test_fsdp_gradients_equal_single_process_and_each_fix_is_needed"
    ),
    "dist_checkpointing.optimizer.to_local_if_dtensor": (
        "unit/test_upstream_fsdp.py::test_optimizer_state_maps_onto_the_fsdp_shards"
    ),
    "FP32Optimizer.load_state_dict": "unit/test_upstream_fsdp.py::test_plain_optimizer_loads_local_shards_back_as_dtensors",
    "MLP.sharded_state_dict": "distributed/test_fsdp.py::test_every_fsdp_shard_is_saved_at_its_own_address",
    "MLASelfAttention.get_query_key_value_tensors": (
        "distributed/test_mla_tensor_parallel.py::test_mla_tensor_parallel_gradients_need_the_rope_key_fix"
    ),
    "SequentialMLP.sharded_state_dict": "distributed/test_fsdp.py::test_every_fsdp_shard_is_saved_at_its_own_address",
    "GPTModel._postprocess": "unit/test_mtp.py::test_upstream_forward_without_labels_is_fixed",
    "gpt_model.roll_tensor": (
        "distributed/test_mtp_context_parallel.py::test_mtp_at_context_parallel_2_equals_one_rank_and_needs_the_token_count_fix"
    ),
    "DistributedOptimizer._build_model_and_main_param_groups": (
        "e2e/test_optimizer_offload.py::test_offload_under_the_distributed_optimizer_trains_the_same_curve_and_resumes"
    ),
    "HybridDeviceOptimizer._update_fp32_params_by_new_state": (
        "e2e/test_optimizer_offload.py::test_offload_under_the_distributed_optimizer_trains_the_same_curve_and_resumes"
    ),
    "FP32Optimizer.sharded_state_dict": (
        "e2e/test_optimizer_offload.py::test_offloaded_half_of_the_state_trains_the_same_curve_and_resumes"
    ),
}


def _test_functions(path: pathlib.Path) -> set[str]:
    return {n.name for n in ast.parse(path.read_text()).body if isinstance(n, ast.FunctionDef)}


def test_every_fix_is_a_patch_with_a_site_test():
    from upstream.fixes import FIXES

    assert sorted(FIXES.names()) == sorted(SITE_TESTS)
    assert all(isinstance(p, Patch) and p.site for p in FIXES.patches)
    for name, test in SITE_TESTS.items():
        path, function = test.split("::")
        assert function in _test_functions(REPO / "tests" / path), name
