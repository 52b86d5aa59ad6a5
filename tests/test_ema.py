"""EMA of the student LoRA (ema.py): the decay schedule in closed form, the EMA of known weight sequences against
Flow-GRPO's call pattern, and the EMA adapter on a transformer."""
import pytest
import torch

import ema


def test_decay_schedule_closed_form():
    assert [ema.decay(t) for t in (0, 7, 15, 23)] == [1 / 10, 8 / 17, 16 / 25, 24 / 33]
    assert ema.decay(79) == 80 / 89 < 0.9 and ema.decay(80) == pytest.approx(0.9) and ema.decay(10**6) == 0.9
    assert all(ema.decay(t) == min((1 + t) / (10 + t), 0.9) for t in range(200))
    assert [t for t in range(1, 40) if ema.due(t)] == [7, 15, 23, 31, 39]


def flow_grpo_calls(thetas: list[torch.Tensor], G: int) -> list[torch.Tensor]:
    """The EMA as Flow-GRPO's loop produces it: one update call per micro-batch with the optimizer-step counter,
    which advances (and the weights change) at the last micro-batch of each group of G; the update runs when
    (counter + 1) % 8 == 0. thetas[s]: the weights after optimizer step s. -> the EMA after each group s >= 1."""
    value, counter, after = thetas[0].clone(), 0, []
    for s in range(1, len(thetas)):
        for m in range(G):
            if m == G - 1:
                counter += 1                                                   # the sync: optimizer step s
            weights = thetas[s] if m == G - 1 else thetas[s - 1]
            if (counter + 1) % 8 == 0:
                d = min((1 + counter) / (10 + counter), 0.9)
                value = value + (1 - d) * (weights - value)
        after.append(value)
    return after


@pytest.mark.parametrize("G", [1, 3])
def test_ema_of_a_known_weight_sequence_matches_flow_grpo_calls(G):
    thetas = [torch.tensor([float(s), (-1.0) ** s * s * s], dtype=torch.float64) for s in range(41)]   # theta_s
    state = ema.EMA([thetas[0].clone()], G)
    ours = []
    for s in range(1, 41):
        state.after_optimizer_step([thetas[s]])
        ours.append(state.weights[0].clone())
    theirs = flow_grpo_calls(thetas, G)
    # equal after every even step: an odd step t = 7 mod 8 has Flow-GRPO's G - 1 trailing calls still to come
    for s in range(2, 41, 2):
        assert torch.allclose(ours[s - 1], theirs[s - 1], rtol=1e-12, atol=1e-12), s
    # closed form: untouched before t = 7; at t = 7 one pull of weight 1 - (8/17)^G toward theta_7 = [7, -49]
    assert all(torch.equal(ours[s - 1], thetas[0]) for s in range(1, 7))
    pull = 1 - (8 / 17) ** G
    assert torch.allclose(ours[6], pull * thetas[7], rtol=1e-12)
    d15 = (16 / 25) ** G
    assert torch.allclose(ours[14], d15 * ours[6] + (1 - d15) * thetas[15], rtol=1e-12)


def test_constant_weights_are_approached_geometrically():
    state = ema.EMA([torch.zeros(3, dtype=torch.float64)], repeats=2)
    target = torch.ones(3, dtype=torch.float64)
    for _ in range(100):
        state.after_optimizer_step([target])
    remaining = 1.0
    for t in (7, 15, 23, 31, 39, 47, 55, 63, 71, 79, 87, 95):
        remaining *= ema.decay(t) ** 2                                         # ema - theta shrinks by decay_t^G
    assert torch.allclose(state.weights[0], target * (1 - remaining), rtol=1e-12) and state.step == 100


def test_ema_adapter_is_an_exact_frozen_copy_and_the_student_stays_active():
    from diffusers import SD3Transformer2DModel
    from train import Config, add_student
    from teachers import use_adapter
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
                                        caption_projection_dim=16, pooled_projection_dim=8, pos_embed_max_size=8).eval()
    params = add_student(transformer, Config(rank=2, alpha=4.0, targets="attn.to_q,attn.to_k,attn.to_v,attn.to_out.0"))
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.5)                                  # a student away from B = 0
    state = ema.add_ema(transformer, repeats=1)
    assert len(state.weights) == len(params) and ema.names(transformer)[0].count(f".{ema.ADAPTER}.") == 1
    assert all(torch.equal(w, p) and w.dtype == torch.float32 and not w.requires_grad
               for w, p in zip(state.weights, params))
    assert all(p.requires_grad for p in params) and transformer.active_adapters() == ["student"]
    x, text, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 16), torch.randn(2, 8)

    def forward(adapter):
        with use_adapter(transformer, adapter), torch.no_grad():
            return transformer(x, encoder_hidden_states=text, pooled_projections=pooled, timestep=torch.ones(2)).sample
    live = forward("student")
    assert torch.equal(forward(ema.ADAPTER), live)
    with torch.no_grad():
        params[0].add_(1.0)                                                    # the live weights move, the EMA not
    assert not torch.equal(forward("student"), live) and torch.equal(forward(ema.ADAPTER), live)
