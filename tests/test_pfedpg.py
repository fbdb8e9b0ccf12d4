"""pFedPG (arXiv:2308.15367): the prompt generator and its step on tiny cases worked out by hand, the client half, and
a run on the language-model federation with a soft prompt."""

import json

import pytest
import torch

from hetfl.errors import ConfigError
from hetfl.models.transformer import TinyLM
from hetfl.strategies import build_strategy
from hetfl.strategies.base import ClientData, Task
from hetfl.strategies.pfedpg import PFedPG, generate, generator_step, layout
from hetfl.testing import PromptMLP
from hetfl.training import LocalTrainer
from hetfl.config import StrategyConfig, TrainingConfig


def shared(base, w_q, w_k, w_v, w_o, b_o):
    return torch.tensor([*base, *w_q, *w_k, *w_v, *w_o, *b_o], dtype=torch.float32)


# T = 2 base tokens of width d = 1, key width k = 1: P_base = [[1], [2]], W_q = W_k = W_v = W_o = 1, b_o = 0.
TOKENS, DIM, KEY = 2, 1, 1
PHI = shared([1.0, 2.0], [1.0], [1.0], [1.0], [1.0], [0.0])


def test_layout_orders_the_generator_base_then_attention():
    parts = layout(TOKENS, DIM, KEY)
    assert [name for name in parts] == ["base", "w_q", "w_k", "w_v", "w_o", "b_o"]
    assert parts["base"][0] == slice(0, 2) and parts["b_o"][0] == slice(6, 7)


def test_generated_prompt_by_hand():
    # descriptor d = 0: q = W_q d = 0, so both scores K q / sqrt(1) are 0 and a = softmax([0, 0]) = [1/2, 1/2];
    # V = P_base W_v^T = [1, 2], a^T V = 1.5; P = P_base + W_o 1.5 + b_o = [[2.5], [3.5]]
    assert torch.allclose(generate(PHI, torch.tensor([0.0]), TOKENS, DIM, KEY), torch.tensor([[2.5], [3.5]]))
    # descriptor d = 1: scores = W_q d W_k P_base = [1, 2], a = [1/(1+e), e/(1+e)] = [0.2689, 0.7311],
    # a^T V = 0.2689 + 2 * 0.7311 = 1.7311; P = [[2.7311], [3.7311]]
    assert torch.allclose(generate(PHI, torch.tensor([1.0]), TOKENS, DIM, KEY), torch.tensor([[2.7311], [3.7311]]),
                          atol=1e-4)


def test_generator_step_by_hand():
    # client 0 (descriptor 0) was sent P = [2.5, 3.5] and trained it into P~ = [3.5, 3.5]: P - P~ = [-1, 0].
    # The step is phi - lr * J^T (P - P~), lr = 1, weight 1 (one client). With a = [1/2, 1/2], out = a^T V = 1.5:
    #   b_o:  dP_t/db_o = 1            -> grad = -1 + 0 = -1               -> b_o = 1
    #   W_o:  dP_t/dW_o = out = 1.5    -> grad = 1.5 * -1 = -1.5           -> W_o = 2.5
    #   W_v:  dP_t/dW_v = W_o a^T P_base = 1.5 -> grad -1.5                -> W_v = 2.5
    #   W_q, W_k: the scores are W_q d W_k P_base_s with d = 0: their derivatives carry a factor d (W_q) or
    #         q = 0 (W_k)                                                -> grad 0, unchanged
    #   P_base_s: dP_t/dB_s = [s == t] + W_o W_v a_s (the scores' path carries q = 0)
    #         grad_s = (P - P~)_s + a_s * sum_t (P - P~)_t = [-1 - 0.5, 0 - 0.5] -> P_base = [2.5, 2.5]
    #   d:    d score_s / dd = W_q W_k B_s = B_s = [1, 2]; da_s/dd = a_s (B_s - a^T B) = [-0.25, 0.25];
    #         d out / dd = W_v sum_s B_s da_s/dd = -0.25 + 0.5 = 0.25; dP_t/dd = W_o 0.25
    #         grad = 0.25 * sum_t (P - P~)_t = -0.25                      -> d = 0.25
    descriptors = torch.tensor([[0.0], [7.0]])  # client 1 is not in the round: its descriptor does not move
    phi, desc = generator_step(PHI, descriptors, [0], [torch.tensor([[2.5], [3.5]])], [torch.tensor([3.5, 3.5])],
                               torch.tensor([1.0]), 1.0, TOKENS, DIM, KEY)
    assert torch.allclose(phi, shared([2.5, 2.5], [1.0], [1.0], [2.5], [2.5], [1.0]))
    assert torch.allclose(desc, torch.tensor([[0.25], [7.0]]))
    assert torch.equal(PHI, shared([1.0, 2.0], [1.0], [1.0], [1.0], [1.0], [0.0]))  # the arguments are not changed


def test_a_round_steps_on_the_sample_weighted_directions():
    # one token (T = 1): a = [1] whatever the descriptor, so G(d) = B + W_o W_v B + b_o = B with W_o = b_o = 0.
    # B = 0. Client 0 (1 sample) moved its prompt to 4, client 1 (3 samples) to 0 and... to 8: p = [1/4, 3/4]
    #   B: dP/dB = 1 + W_o W_v = 1 -> grad = 1/4 (0 - 4) + 3/4 (0 - 8) = -7 -> B = 0.5 * 7 = 3.5 with lr 0.5
    #   W_o: dP/dW_o = W_v B = 0 -> 0;  b_o: dP/db_o = 1 -> grad -7 -> b_o = 3.5;  W_v: W_o B = 0 -> 0
    phi0 = shared([0.0], [1.0], [1.0], [1.0], [0.0], [0.0])
    phi, desc = generator_step(phi0, torch.zeros(2, 1), [0, 1], [torch.zeros(1, 1)] * 2,
                               [torch.tensor([4.0]), torch.tensor([8.0])], torch.tensor([0.25, 0.75]), 0.5, 1, 1, 1)
    assert torch.allclose(phi, shared([3.5], [1.0], [1.0], [1.0], [0.0], [3.5]))
    assert torch.equal(desc, torch.zeros(2, 1))


def mlp_trainer():
    torch.manual_seed(0)
    return LocalTrainer(PromptMLP((4,), 3), TrainingConfig(local_steps=3, batch_size=4, lr=0.1))


def test_client_trains_its_prompt_and_head_only_and_keeps_them():
    trainer = mlp_trainer()
    strategy = PFedPG()
    prompt = torch.arange(4.0).reshape(1, 4)
    task = Task(0, 0, 0, strategy.initial_params(trainer), 3, 0.0, payload={"prompt": prompt})
    g = torch.Generator().manual_seed(0)
    data = ClientData(0, torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g))
    state = {}
    result = strategy.client_train(trainer, task, data, state, seed=1)
    assert result.params.shape == (4,) and not torch.equal(result.params, prompt.reshape(-1))
    assert torch.equal(state["prompt"], result.params) and "head" in state
    own = strategy.personal_params(trainer, task.params, data, state, seed=1)
    body = slice(4, trainer.head_slice.start)  # prompt (4 entries) first, then the body: frozen
    assert torch.equal(own[body], trainer.initial[body])
    assert torch.equal(own[:4], result.params) and torch.equal(own[trainer.head_slice], state["head"])
    assert not torch.equal(state["head"], trainer.initial[trainer.head_slice])
    # a client that never trained: the backbone with the generator's base prompt (the model's own) and its head
    fresh = strategy.personal_params(trainer, task.params, data, {}, seed=1)
    assert torch.equal(fresh, trainer.initial)


def test_without_local_head_only_the_prompt_moves():
    trainer = mlp_trainer()
    strategy = PFedPG(local_head=False)
    task = Task(0, 0, 0, strategy.initial_params(trainer), 3, 0.0, payload={"prompt": torch.ones(1, 4)})
    data = ClientData(0, torch.randn(8, 4), torch.randint(0, 3, (8,)))
    state = {}
    strategy.client_train(trainer, task, data, state, seed=1)
    assert set(state) == {"prompt"}


def test_a_model_without_a_prompt_is_refused_in_one_line():
    torch.manual_seed(0)
    trainer = LocalTrainer(torch.nn.Sequential(torch.nn.Linear(4, 3)), TrainingConfig())
    with pytest.raises(ConfigError, match="model.prompt_tokens"):
        PFedPG().check_models([trainer])


@pytest.mark.parametrize("params", [{"key_dim": 0}, {"generator_lr": 0.0}])
def test_bad_parameters_name_the_key(params):
    with pytest.raises(ConfigError, match=f"strategy.params.*{next(iter(params))}"):
        build_strategy(StrategyConfig(name="pfedpg", params=params))


def test_tinylm_soft_prompt_is_a_prefix_and_zero_tokens_is_the_plain_model():
    torch.manual_seed(0)
    plain = TinyLM(vocab_size=11, d_model=8, n_heads=2, d_ff=8, n_layers=1, context=5)
    torch.manual_seed(0)
    prompted = TinyLM(vocab_size=11, d_model=8, n_heads=2, d_ff=8, n_layers=1, context=5, prompt_tokens=3)
    assert prompted.prompt.shape == (3, 8)  # blanks at positions 0, 1, 2: token 10 (the last of 11) plus positions
    assert torch.equal(prompted.prompt, prompted.tok.weight[10] + prompted.pos.weight[:3])
    others = {k: v for k, v in prompted.state_dict().items() if k != "prompt"}
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in others.items())  # nothing drawn: the rest is the same
    x = torch.randint(0, 11, (2, 5))
    out = prompted(x)
    assert out.shape == (2, 5, 11)  # the prompt's positions are dropped
    assert not torch.allclose(out, plain(x))  # every token attends to the prompt
    # causality holds for the input: the first position's logits do not depend on later tokens
    y = x.clone()
    y[:, 1:] = (y[:, 1:] + 1) % 11
    assert torch.allclose(prompted(y)[:, 0], out[:, 0], atol=1e-6)
    assert prompted.sizes() == plain.sizes()  # the pretrained base of a prompted model is the plain one's


def test_pfedpg_runs_on_a_prompted_tinylm_moving_only_prompts(tmp_path):
    # 4 text clients, a d_model-16 TinyLM pretrained briefly, 4 soft-prompt rows: the backbone never moves, a task
    # moves 4 x 16 float32 = 256 bytes each way, and the clients' own prompts lower the perplexity
    from test_lm_task import lm_config
    from hetfl.config import validate
    from hetfl.engine.run import run_experiment

    raw = lm_config(tmp_path)
    raw["model"]["prompt_tokens"] = 4
    raw["strategy"] = {"name": "pfedpg", "clients_per_round": 3}
    summary = run_experiment(validate(raw), tmp_path / "run", show_progress=False)
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["perplexity"] < lines[0]["perplexity"]
    tasks = sum(summary["tasks_per_client"])
    assert summary["bytes_down"] == tasks * 256 and summary["bytes_up"] == summary["updates"] * 256
    assert summary["strategy_summary"]["client_trainable_params"] == 64
