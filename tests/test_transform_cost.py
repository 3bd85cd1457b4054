"""What a transform by example costs: work it does once, and FLOPs counted only when asked.

Counts, not times (the CI machine is shared): how often an op is evaluated on the example's
values, how often torch.fx's bytecode lookup runs, whether the FLOP counter is entered. And the
results must not move: the same generated code, outputs and step costs as without the reuse.
"""

from __future__ import annotations

import collections
import dis
import sys
import warnings

import pytest
import torch
from torch import nn

import fxsd
import fxsd.tracing._example_memo as example_memo
import fxsd.tracing.by_example as by_example
import fxsd.tracing.tracer as tracing
from fxsd.decisions.step_costs import measure_step_costs
from fxsd.runtime.accessors import gated_blocks

tf = pytest.importorskip("transformers")


def _llama() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    return tf.LlamaForCausalLM(config), {"input_ids": ids}


def _t5() -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    config = tf.T5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                         num_decoder_layers=2, num_heads=4, decoder_start_token_id=0)
    gen = torch.Generator().manual_seed(0)
    return tf.T5ForConditionalGeneration(config), {
        "input_ids": torch.randint(0, 128, (2, 9), generator=gen),
        "decoder_input_ids": torch.randint(0, 128, (2, 5), generator=gen)}


def _transform(model: nn.Module, inputs: dict, **options) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxsd.stochastic_depth(model, 0.1, example_kwargs=inputs, seed=0, **options)


class _LinearCalls:
    """Counts the calls of one ``nn.Linear`` (a torch.nn layer the traces keep whole and
    evaluate on the example's values)."""

    def __init__(self, target: nn.Linear) -> None:
        self.target, self.count = target, 0

    def __enter__(self) -> _LinearCalls:
        self.original = nn.Linear.forward
        counter = self

        def forward(module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            counter.count += module is counter.target
            return counter.original(module, x)

        nn.Linear.forward = forward
        return self

    def __exit__(self, *exc: object) -> None:
        nn.Linear.forward = self.original


def test_a_layer_is_evaluated_once_per_mode_not_once_per_trace():
    # Llama's layers are traced 4 times each (two ways of tracing its None arguments, each in
    # training and eval mode), its LlamaModel 10 times: each trace evaluated every op on the
    # example's values again (10 calls of this projection). Now a unit's traces share what was
    # evaluated, per mode: the example run, then LlamaModel's and the layer's own traces in
    # each mode (where the attention before it reads its module's mode).
    model, inputs = _llama()
    with _LinearCalls(model.model.layers[0].mlp.down_proj) as calls, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fxsd.analyze_residuals(model, example_kwargs=inputs)
    assert calls.count <= 8


@pytest.mark.slow
def test_the_callers_bytecode_is_disassembled_once_per_function(monkeypatch):
    # torch.fx's Proxy.__iter__ disassembled the whole calling function at every unpacking of a
    # proxy (`b, n = x.shape[:2]`): 60 times T5's attention forward for a 2+2-layer T5
    seen: collections.Counter = collections.Counter()
    original = dis.get_instructions

    def counted(code, *args, **kwargs):
        seen[code] += 1
        return original(code, *args, **kwargs)

    monkeypatch.setattr(dis, "get_instructions", counted)
    tracing._instructions.cache_clear()  # earlier tests of this process filled it
    model, inputs = _t5()
    _transform(model, inputs)
    assert seen and max(seen.values()) == 1


@pytest.mark.slow
def test_evaluating_an_op_looks_no_module_up_by_its_path(monkeypatch):
    # Each op evaluated on the example's values looked its module up by path up to three times
    # (its memo key, whether it is the model's code, the call), and while a trace runs,
    # get_submodule goes through torch.fx's patched __getattr__ at every level of the path:
    # 7,334 look-ups for a 6+6-layer T5. The tracer now keeps one table per trace.
    looked_up: collections.Counter = collections.Counter()
    original = nn.Module.get_submodule

    def counted(self, target):
        caller = sys._getframe(1).f_code.co_filename
        if caller in (by_example.__file__, example_memo.__file__):
            looked_up[target] += 1
        return original(self, target)

    monkeypatch.setattr(nn.Module, "get_submodule", counted)
    model, inputs = _t5()
    gated = _transform(model, inputs)
    assert looked_up == {}
    assert len(fxsd.gates(gated)) > 0


def test_no_flop_count_unless_asked_and_the_table_counts_the_same(monkeypatch):
    from torch.utils.flop_counter import FlopCounterMode

    entered = []
    original = FlopCounterMode.__enter__

    def enter(self):
        entered.append(self)
        return original(self)

    monkeypatch.setattr(FlopCounterMode, "__enter__", enter)
    model, inputs = _llama()
    gated = _transform(model, inputs)
    assert entered == []  # no target_saving: nothing asked for the step's FLOPs yet
    text = fxsd.table(gated, width=0)
    assert len(entered) == 1 and "step %" in text.splitlines()[0]
    record = fxsd.get_record(gated)
    eager = measure_step_costs(gated, (), inputs)
    assert record.step_flops == eager.total > 0
    assert {n: g.info.step_flops for n, g in fxsd.runtime.accessors.named_gates(gated).items()} \
        == eager.sites
    fxsd.expected_saving(gated)
    assert len(entered) == 2  # the measure above; the table's count is kept, not redone


def test_a_copy_counts_its_costs_when_asked():
    import copy

    model, inputs = _llama()
    gated = _transform(model, inputs)
    twin = copy.deepcopy(gated)
    assert fxsd.expected_saving(twin) == pytest.approx(fxsd.expected_saving(gated))
    assert fxsd.get_record(twin).step_flops == fxsd.get_record(gated).step_flops


def test_target_saving_still_counts_at_transform_time():
    model, inputs = _llama()
    gated = fxsd.stochastic_depth(model, target_saving=0.05, example_kwargs=inputs, seed=0)
    record = fxsd.get_record(gated)
    assert record.step_flops is not None and record.pending_costs is None
    assert fxsd.expected_saving(gated) == pytest.approx(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("build", [_llama, _t5], ids=["llama", "t5"])
def test_reusing_evaluations_changes_no_result(build, monkeypatch):
    model, inputs = build()
    reused = _transform(model, inputs)
    monkeypatch.setattr(by_example, "_memo_key", lambda *args: None)  # evaluate every time
    fresh = _transform(model, inputs)
    codes = {path: m.code for path, m in gated_blocks(reused).items()}
    assert codes == {path: m.code for path, m in gated_blocks(fresh).items()}
    for gated in (reused, fresh):
        gated.eval()
    torch.testing.assert_close(reused(**inputs).logits, fresh(**inputs).logits,
                               rtol=0, atol=0)
    torch.testing.assert_close(reused(**inputs).logits, model.eval()(**inputs).logits,
                               rtol=0, atol=0)


class _Traces:
    """Counts the symbolic traces of each unit (by its path), failed ones included."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import fxsd.tracing._train_eval as train_eval

        self.counts: collections.Counter[str] = collections.Counter()
        original = train_eval._symbolic_trace

        def counted(model, tracer, concrete_args):
            self.counts[tracer.prefix.rstrip(".")] += 1
            return original(model, tracer, concrete_args)

        monkeypatch.setattr(train_eval, "_symbolic_trace", counted)


def test_none_arguments_are_searched_in_one_mode(monkeypatch):
    # The search for the None arguments a unit only passes on traced every candidate in
    # training and eval mode: T5's encoder 16 times, its first decoder block 15 (4 arguments,
    # of which 2 only passed on). Candidates alone are now traced in one mode; the set chosen
    # is traced in both, and must match there as a whole.
    model, inputs = _t5()
    traces = _Traces(monkeypatch)
    gated = _transform(model, inputs)
    assert traces.counts["encoder"] <= 12
    assert traces.counts["decoder.block.0"] <= 11
    model.eval()
    gated.eval()
    with torch.no_grad():
        assert torch.equal(gated(**inputs).logits, model(**inputs).logits)


class _Passes(nn.Module):
    """Decides by ``a is None`` in eval mode only: ``a`` may stay an input in training mode,
    not in both."""

    def forward(self, x: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
        return x * (2.0 if self.training or a is None else 3.0)


class _Unit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _Passes()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, a=None, b=None, c=None):
        y = self.inner(self.lin(x), a)
        if b is None:  # steers the code: stays a constant
            y = y + 1
        return y, c  # c is only passed on: stays an input


def test_none_search_falls_back_to_both_modes():
    # In training mode alone, a and c each pass (the set {a, c} is chosen); traced in eval
    # mode too, {a, c} does not match, and the search runs again in both modes: only c stays
    # an input, as the search in both modes always chose.
    from fxsd.analysis._free_nones import trace_freeing_nones
    from fxsd.tracing.example_run import record_calls
    from fxsd.tracing.guards import check_argument

    model = _Unit().train()
    x = torch.randn(2, 4)
    recorded = record_calls(model, (x,), {})
    gm, _ = trace_freeing_nones(model, "", recorded[id(model)], [], ())
    guarded = {n.args[3] for n in gm.graph.nodes
               if n.op == "call_function" and n.target is check_argument}
    assert guarded == {"a", "b"}
    assert "c" in {n.target for n in gm.graph.nodes if n.op == "placeholder"}
    for mode in (True, False):
        model.train(mode)
        out, passed = gm(x, c=x)
        expected, _ = model(x)
        assert torch.equal(out, expected) and passed is x
