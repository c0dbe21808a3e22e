"""Chapter 12: the recall task, the three-attention model, the training loop (small, < 30 s)."""

import dataclasses

import pytest
import torch

import nsa
from nsa.training import (ATTENTIONS, CPU_EXPERIMENT, IGNORE_INDEX, RecallExperiment, RecallTask,
                          RecallTransformer, accuracy_by_distance, dense_mask_attention, make_recall_batch,
                          nsa_block_selection, read_results, shared_projection_attention,
                          train_recall, write_results)

TINY = RecallExperiment(task=RecallTask(seq_len=40, num_pairs=4, num_keys=6, num_values=5, num_filler=7),
                        dim=16, depth=2, heads=2, compress_block_size=8, compress_stride=4,
                        select_block_size=16, num_selected_blocks=3, window_size=6, backend="torch",
                        steps=2, batch_size=3, eval_distances=(2, 7, 30), eval_batch_size=2)


def check_answers(task, tokens, targets, distances):
    queries = (targets != IGNORE_INDEX).nonzero().tolist()
    assert queries, "a batch without queries"
    assert ((distances > 0) == (targets != IGNORE_INDEX)).all()
    for b, q in queries:
        store = q - int(distances[b, q])
        key, value = tokens[b, q].item(), targets[b, q].item()
        assert task.num_filler <= key < task.num_filler + task.num_keys
        assert value >= task.num_filler + task.num_keys
        assert tokens[b, store] == key and tokens[b, store + 1] == value and tokens[b, q + 1] == value
        assert (tokens[b] == key).sum() == 2
    return queries


@pytest.mark.parametrize("task", [RecallTask(), TINY.task, RecallTask(seq_len=301, num_pairs=16)], ids=str)
def test_answers_are_the_stored_values(task):
    for seed in range(5):
        tokens, targets, distances = make_recall_batch(task, 4, seed)
        assert tokens.shape == targets.shape == distances.shape == (4, task.seq_len)
        assert tokens.dtype == torch.int64 and 0 <= tokens.min() and tokens.max() < task.vocab_size
        check_answers(task, tokens, targets, distances)


@pytest.mark.parametrize("distance", [2, 3, 17, 64, 100, 126])
def test_distances_as_requested(distance):
    task = RecallTask()
    tokens, targets, distances = make_recall_batch(task, 6, seed=distance, distance=distance)
    check_answers(task, tokens, targets, distances)
    assert (distances[distances > 0] == distance).all()


def test_batches_are_reproducible_and_distinct():
    task = RecallTask()
    first, second = make_recall_batch(task, 2, seed=3), make_recall_batch(task, 2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], make_recall_batch(task, 2, seed=4)[0])


def test_training_distances_cover_the_range():
    task = RecallTask()
    _, _, distances = make_recall_batch(task, 64, seed=0)
    drawn = distances[distances > 0]
    assert drawn.min() < 4 and drawn.max() > 100 and (drawn < 16).float().mean() > 0.2


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_pairs=17), "num_pairs"), (dict(seq_len=30), "seq_len"), (dict(min_distance=1), "min_distance"),
    (dict(num_keys=0), "num_keys"), (dict(seq_len=12.0), "seq_len")])
def test_task_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecallTask(**kwargs)


def test_batch_validation():
    with pytest.raises(ValueError, match="distance"):
        make_recall_batch(RecallTask(), 2, 0, distance=127)
    with pytest.raises(ValueError, match="batch_size"):
        make_recall_batch(RecallTask(), 0, 0)
    with pytest.raises(ValueError, match="attention"):
        RecallTransformer(10, attention="linear")


@pytest.mark.parametrize("attention", ATTENTIONS)
@pytest.mark.parametrize("dense_masks", [False, True])
def test_forward_shapes(attention, dense_masks):
    experiment = dataclasses.replace(TINY, nsa_dense_masks=dense_masks)
    model = experiment.make_model(attention)
    for N in (1, 17, 40):
        tokens = torch.randint(experiment.task.vocab_size, (2, N))
        assert model(tokens).shape == (2, N, experiment.task.vocab_size)


def test_same_parameters_for_all_attentions():
    models = [TINY.make_model(attention) for attention in ATTENTIONS]
    states = [dict(m.named_parameters()) for m in models]
    assert all(states[0].keys() == s.keys() for s in states)
    assert all(torch.equal(states[0][k], s[k]) for s in states for k in s)


def test_nsa_dense_masks_equal_gather():
    model = dataclasses.replace(TINY, nsa_dense_masks=True).make_model("nsa").double()
    tokens = make_recall_batch(TINY.task, 2, seed=1)[0]
    with torch.no_grad():
        masked = model(tokens)
        for block in model.blocks:
            block.nsa_dense_masks = False
        torch.testing.assert_close(model(tokens), masked)


@pytest.mark.parametrize("kwargs", [dict(heads=4, kv_heads=1), dict(heads=2, kv_per_branch=True, num_mem_kv=2),
                                    dict(heads=4, kv_heads=2, compress_mlp=False)],
                         ids=["gqa", "kv-per-branch-memory", "mean-pooling"])
def test_dense_mask_attention_is_the_layer(kwargs):
    """The CPU run's fast path (SDPA under the selection and window masks) equals the layer on the
    torch backend, also where the recall model does not go: GQA, per-branch keys, memory rows."""
    torch.manual_seed(2)
    layer = nsa.SparseAttention(16, compress_block_size=8, compress_stride=4, select_block_size=8,
                                num_selected_blocks=3, num_local_blocks=1, window_size=6, backend="torch",
                                **kwargs).double()                        # 45 tokens: 6 blocks, 1 free slot
    for N in (1, 9, 45):
        x = torch.randn(2, N, 16, dtype=torch.float64, requires_grad=True)
        expected = layer(x)
        (grad_expected,) = torch.autograd.grad(expected.square().sum(), x)
        fast = dense_mask_attention(layer, x)
        torch.testing.assert_close(fast, expected)
        torch.testing.assert_close(torch.autograd.grad(fast.square().sum(), x)[0], grad_expected)


def test_shared_projection_attention_is_chapter_1():
    layer = nsa.SparseAttention(24, heads=4, kv_heads=2, window_size=5).double()
    x = torch.randn(2, 17, 24, dtype=torch.float64)
    q = layer.to_q(x).unflatten(-1, (4, 6))
    k, v = (f["shared"](x).unflatten(-1, (2, 6)) for f in (layer.to_k, layer.to_v))
    for window, mask in ((None, nsa.causal_mask(17, 17)), (5, nsa.sliding_window_mask(17, 17, 5))):
        expected = layer.to_out(nsa.attention(q, k, v, mask).flatten(2))
        torch.testing.assert_close(shared_projection_attention(layer, x, window), expected)
    with pytest.raises(ValueError, match="kv_per_branch"):
        shared_projection_attention(nsa.SparseAttention(24, 4, kv_per_branch=True), x.float())


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_one_step_reduces_loss_on_a_fixed_batch(attention):
    model = TINY.make_model(attention)
    tokens, targets, _ = make_recall_batch(TINY.task, 8, seed=11)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def loss():
        logits = model(tokens)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                 ignore_index=IGNORE_INDEX)

    before = loss()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        assert loss() < before.detach()


def test_train_eval_select_and_results_roundtrip(tmp_path):
    histories, accuracy = {}, {}
    for attention in ATTENTIONS:
        model = TINY.make_model(attention)
        histories[attention] = train_recall(model, TINY, desc=attention)
        accuracy[attention] = accuracy_by_distance(model, TINY)
    assert histories["nsa"]["step"] == [0, 1] and histories["nsa"]["tokens_per_s"] > 0
    assert accuracy["dense"]["distance"] == list(TINY.eval_distances)
    assert all(0 <= a <= 1 for a in accuracy["window"]["accuracy"])
    tokens = make_recall_batch(TINY.task, 2, seed=0)[0]
    scores, block_indices = nsa_block_selection(model, tokens, layer_index=1)
    assert scores.shape == (2, 40, 2, 3) and block_indices.shape == (2, 40, 2, 3)
    assert block_indices.dtype == torch.int32
    write_results(tmp_path, "cpu", TINY, histories, accuracy, {"device": "cpu"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training_cpu.csv", "training_cpu.json",
                                                          "training_cpu_curves.csv"]
    read_accuracy, read_histories, summary = read_results(tmp_path, "cpu")
    assert read_accuracy["nsa"]["distance"] == accuracy["nsa"]["distance"]
    assert read_histories["dense"]["step"] == [0, 1] and summary["device"] == "cpu"
    assert read_results(tmp_path, "h200") is None


def test_length_curriculum(monkeypatch):
    """The first short_steps batches come from the short task, the rest from the task itself."""
    experiment = dataclasses.replace(TINY, steps=3, short_seq_len=24, short_steps=2)
    assert experiment.short_task.seq_len == 24 and experiment.task.seq_len == 40
    lengths, make_batch = [], nsa.training.make_recall_batch
    monkeypatch.setattr(nsa.training, "make_recall_batch",
                        lambda task, *args, **kwargs: lengths.append(task.seq_len) or make_batch(task, *args, **kwargs))
    history = train_recall(experiment.make_model("window"), experiment)
    assert history["step"] == [0, 1, 2]
    assert lengths[:3] == [24, 24, 40]
    with pytest.raises(ValueError, match="short_steps"):
        dataclasses.replace(TINY, short_steps=5)
    with pytest.raises(ValueError, match="short_seq_len"):
        dataclasses.replace(TINY, short_steps=1)
    with pytest.raises(ValueError, match="seq_len"):
        dataclasses.replace(TINY, short_seq_len=8, short_steps=1)


def test_cpu_experiment_is_the_chapter_default():
    assert CPU_EXPERIMENT.nsa_dense_masks and CPU_EXPERIMENT.task == RecallTask()
