"""The operator schemas of torch-npu 2.13.0 (the release pinned by pyproject's ``npu`` extra).

Each string is exactly what the wheel registers with the PyTorch dispatcher, read from the binary
(the most authoritative source; ``tests/npu_emulation/test_schemas.py`` re-checks every one against
the wheel):

* ``atb::`` ops: ``torch_npu/lib/libop_plugin_atb.so``. Two strings are stored whole in .rodata
  (``_npu_paged_attention_v2.out``, ``_npu_flash_attention_prefix_v2.out``); GCC built the others
  from 16-byte .rodata pieces plus immediates, and they were reassembled from the disassembly
  (every 16-byte piece is in the file; the test checks each). The overload lists below are every
  overload the .so registers for these names (the ``_v2`` ops have only ``.out``).
* ``npu::`` ops: ``torch_npu/lib/libtorch_npu.so`` (stored whole). NOTE: the codegen
  (``torchnpugen/custom_functions.py`` RegisterCustomSchema) renames ``self`` to ``input`` when it
  registers, so the dispatcher schema of ``npu_rms_norm`` says ``Tensor input`` although
  ``_op_plugin_docs.py`` and ``csrc/aten/npu_native_functions_by_codegen.yaml`` say ``Tensor self``.

Known differences between these and the wheel's other (documentation) sources, each confirmed
against the binary; ``DOC_DIFFERENCES`` lists them so the test can tell drift from known doc errors.
"""

from __future__ import annotations

from dataclasses import dataclass

WHEEL = "torch_npu-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl"
TORCH_NPU_VERSION = "2.13.0"
ATB_SO = "torch_npu/lib/libop_plugin_atb.so"
NPU_SO = "torch_npu/lib/libtorch_npu.so"
ATB_DOCS = "torch_npu/op_plugin/atb/_atb_api_docs.py"
OP_DOCS = "torch_npu/_op_plugin_docs.py"
ATB_HEADER = "torch_npu/include/third_party/op-plugin/op_plugin/include/AtbOpsInterface.h"


@dataclass(frozen=True)
class OpSchema:
    name: str  # operator name (what torch_npu exposes)
    namespace: str  # "atb" (NNAL/ATB ops, lazily loaded) or "npu" (aclnn ops in libtorch_npu)
    python_module: str  # where torch_npu exposes it: "torch_npu" or "torch_npu.atb"
    schemas: tuple[str, ...]  # every registered overload, exactly as registered
    source: str  # the file the strings were read from
    how: str  # "whole string" or "reassembled from 16-byte .rodata pieces"


OPERATORS: dict[str, OpSchema] = {
    op.name: op
    for op in (
        OpSchema(
            "_npu_reshape_and_cache", "atb", "torch_npu",
            ("_npu_reshape_and_cache(Tensor key, Tensor value, Tensor(a!) key_cache, "
             "Tensor(b!) value_cache, Tensor slot_indices) -> ()",),
            ATB_SO, "reassembled from 16-byte .rodata pieces",
        ),
        OpSchema(
            "_npu_paged_attention", "atb", "torch_npu",
            ("_npu_paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, "
             "int num_kv_heads, int num_heads, float scale_value, Tensor block_table, "
             "Tensor context_lens, Tensor(a!) out, *,Tensor? workspace=None) -> ()",),
            ATB_SO, "reassembled from 16-byte .rodata pieces",
        ),
        OpSchema(
            "_npu_paged_attention_v2", "atb", "torch_npu.atb",
            ("_npu_paged_attention_v2.out(Tensor query, Tensor key_cache, Tensor block_table, "
             "SymInt[] context_lens, *, Tensor? value_cache=None, Tensor? mask=None, "
             "int num_kv_heads=0, int num_heads=0, float scale_value=1.0, int mask_type=0, "
             "Tensor? workspace=None, Tensor(a!) out) -> Tensor(a!)",),
            ATB_SO, "whole string",
        ),
        OpSchema(
            "_npu_flash_attention", "atb", "torch_npu",
            ("_npu_flash_attention(Tensor query, Tensor key, Tensor value, Tensor mask, "
             "Tensor seq_len, float scale_value, int num_heads, int num_kv_heads, "
             "Tensor(a!) out) -> ()",),
            ATB_SO, "reassembled from 16-byte .rodata pieces",
        ),
        OpSchema(
            "_npu_flash_attention_v2", "atb", "torch_npu.atb",
            ("_npu_flash_attention_v2.out(Tensor query, Tensor key, Tensor value, "
             "SymInt[] seq_len, *, Tensor? mask=None, Tensor? slopes=None, int kernel_type=0, "
             "int mask_type=2, float scale_value=1, int num_heads=0, int num_kv_heads=0, "
             "Tensor(a!) out) -> Tensor(a!)",),
            ATB_SO, "reassembled from 16-byte .rodata pieces",
        ),
        OpSchema(
            "_npu_flash_attention_prefix_v2", "atb", "torch_npu.atb",
            ("_npu_flash_attention_prefix_v2.out(Tensor query, Tensor key_cache, "
             "Tensor value_cache, Tensor block_table, Tensor mask, SymInt[] seq_len, "
             "SymInt[] context_lens, *, Tensor? slopes=None, int kernel_type=1, int mask_type=3, "
             "int num_kv_heads=0, int num_heads=0, float scale_value=1, Tensor(a!) out) "
             "-> Tensor(a!)",),
            ATB_SO, "whole string",
        ),
        OpSchema(
            "_npu_paged_attention_splitfuse", "atb", "torch_npu",
            ("_npu_paged_attention_splitfuse(Tensor query, Tensor key_cache, Tensor value_cache, "
             "Tensor block_table, Tensor context_lens, Tensor mask, Tensor seq_len, "
             "int num_kv_heads, int num_heads, float scale_value, Tensor(a!) out) -> ()",),
            ATB_SO, "reassembled from 16-byte .rodata pieces",
        ),
        OpSchema(
            "npu_rms_norm", "npu", "torch_npu",
            ("npu_rms_norm(Tensor input, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)",),
            NPU_SO, "whole string",
        ),
        OpSchema(
            "npu_add_rms_norm", "npu", "torch_npu",
            ("npu_add_rms_norm(Tensor x1, Tensor x2, Tensor gamma, float epsilon=1e-06) "
             "-> (Tensor, Tensor, Tensor)",),
            NPU_SO, "whole string",
        ),
        OpSchema(
            "npu_rotary_mul", "npu", "torch_npu",
            ("npu_rotary_mul(Tensor input, Tensor r1, Tensor r2, str rotary_mode='half', "
             "Tensor? rotate=None) -> Tensor",),
            NPU_SO, "whole string",
        ),
        # int8 linears (models/layers/quant, device_kernels/npu_quant.py): aclnn ops, stored whole
        OpSchema(
            "npu_quantize", "npu", "torch_npu",
            ("npu_quantize(Tensor input, Tensor scales, Tensor? zero_points, int dtype, "
             "int axis=1, bool div_mode=True) -> Tensor",),
            NPU_SO, "whole string",
        ),
        OpSchema(
            "npu_dynamic_quant", "npu", "torch_npu",
            ("npu_dynamic_quant(Tensor input, *, Tensor? smooth_scales=None, "
             "Tensor? group_index=None, int? dst_type=None, str quant_mode=\"pertoken\", "
             "float dst_type_max=0.0) -> (Tensor, Tensor)",),
            NPU_SO, "whole string",
        ),
        OpSchema(
            "npu_quant_matmul", "npu", "torch_npu",
            ("npu_quant_matmul(Tensor x1, Tensor x2, Tensor scale, *, Tensor? offset=None, "
             "Tensor? pertoken_scale=None, Tensor? bias=None, int? output_dtype=None, "
             "int? x1_dtype=None, int? x2_dtype=None, int? pertoken_scale_dtype=None, "
             "int? scale_dtype=None, int[]? group_sizes=None, Tensor? y_scale=None) -> Tensor",),
            NPU_SO, "whole string",
        ),
        OpSchema(
            "npu_weight_quant_batchmatmul", "npu", "torch_npu",
            ("npu_weight_quant_batchmatmul(Tensor x, Tensor weight, Tensor antiquant_scale, "
             "Tensor? antiquant_offset=None, Tensor? quant_scale=None, Tensor? quant_offset=None, "
             "Tensor? bias=None, int antiquant_group_size=0, int inner_precise=0, "
             "int? weight_dtype=None) -> Tensor",),
            NPU_SO, "whole string",
        ),
    )
}

ATB_OPERATORS = frozenset(n for n, op in OPERATORS.items() if op.namespace == "atb")

# Where the wheel's documentation disagrees with the registered schema (the binary wins).
DOC_DIFFERENCES: dict[str, str] = {
    "_npu_flash_attention_prefix_v2": (
        "_atb_api_docs.py documents 'Tensor seq_len, Tensor context_lens'; the .so registers "
        "'SymInt[] seq_len, SymInt[] context_lens' (a host int list; a CPU int tensor also binds)"
    ),
    "_npu_paged_attention_v2": (
        "_atb_api_docs.py omits 'Tensor? workspace=None' (between mask_type and out) that the .so "
        "registers"
    ),
    "npu_rms_norm": "_op_plugin_docs.py and the codegen yaml name the first argument 'self'",
    "npu_dynamic_quant": (
        "_op_plugin_docs.py names the first argument 'x' and omits 'str quant_mode=\"pertoken\", "
        "float dst_type_max=0.0' that the .so registers"
    ),
    "npu_quant_matmul": (
        "_op_plugin_docs.py documents 'ScalarType? output_dtype=None' as the last argument; the .so "
        "registers 'int? output_dtype=None' followed by x1_dtype, x2_dtype, pertoken_scale_dtype, "
        "scale_dtype, group_sizes and y_scale"
    ),
    "npu_weight_quant_batchmatmul": (
        "_op_plugin_docs.py omits the trailing 'int? weight_dtype=None' that the .so registers"
    ),
}
