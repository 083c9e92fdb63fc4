"""explain-generation: chat JSON lines, the response-only loss, the pipeline end to end on a
tiny Llama with SmolLM2's chat template, top.jsonl against scores.npz, and bad input refused in
one line with nothing that looks complete left behind."""

import json

import numpy as np
import pytest
import torch
from tolerances import FLOAT32_PASS, FLOAT64, assert_same_ranking, relative

from datainf.cli import main
from datainf.data.chat import IGNORE, encode_all, lm_batches, read_chat_jsonl
from datainf.gradients.store import GradientStore
from datainf.gradients.tokens import mean_by_owner
from datainf.jobs.explain_generation import response_loss

TOPICS = {"colour": ["red", "blue", "green"], "animal": ["cat", "dog", "fox"]}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def train_records():
    records = []
    for topic, words in TOPICS.items():
        for i, word in enumerate(words * 2):
            if i % 2:
                records.append({"messages": [{"role": "user", "content": f"Name a {topic}."},
                                             {"role": "assistant", "content": word}],
                                "topic": topic})
            else:
                records.append({"prompt": f"Give me one {topic}.", "response": word,
                                "topic": topic})
    return records


@pytest.fixture
def files(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", train_records())
    queries = write_jsonl(tmp_path / "queries.jsonl", [
        {"prompt": "Name a colour.", "response": "light blue"},
        {"messages": [{"role": "user", "content": "Name an animal."},
                      {"role": "assistant", "content": "fox"}], "id": "q2"},
        {"prompt": "Give me one animal."},  # answered by the model
    ])
    return train, queries


def run(tiny_chat_model, train, queries, out, *extra):
    return main(["explain-generation", "--train", train, "--queries", queries, "--model",
               tiny_chat_model, "--out", str(out), "--epochs", "1", "--batch-size", "4",
               "--max-new-tokens", "3", "--quiet", *map(str, extra)])


def test_loss_spans_score_their_tokens(tiny_chat_model, files):
    """--loss-on: the labels of each span; a prompt token's label changes the prompt loss and
    not the response loss; the full loss is both (their token-weighted mean)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from datainf.gradients.tasks import CausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float64).eval()
    examples = read_chat_jsonl(files[0], need_response=True, what="--train")[:2]
    encoded = encode_all(tokenizer, examples, [e.response for e in examples], max_length=128,
                         what="--train")
    batches = {span: lm_batches(encoded, 2, tokenizer.pad_token_id, loss_on=span)[0]
               for span in ("response", "prompt", "full")}
    for row, n_prompt in enumerate(encoded.prompt_lengths):
        n = len(encoded.ids[row])
        ids = batches["full"]["input_ids"][row]
        assert (batches["prompt"]["labels"][row, :n_prompt] == ids[:n_prompt]).all()
        assert (batches["prompt"]["labels"][row, n_prompt:] == IGNORE).all()
        assert (batches["full"]["labels"][row, :n] == ids[:n]).all()
        assert (batches["full"]["labels"][row, n:] == IGNORE).all()
    losses = {span: CausalLM().losses(model, b, torch.arange(2), 0)
              for span, b in batches.items()}
    with torch.no_grad():
        # scored tokens per example: a label at position t is predicted from position t - 1
        scored = {span: (b["labels"][:, 1:] != IGNORE).sum(1).double()
                  for span, b in batches.items()}
        both = (losses["prompt"] * scored["prompt"] + losses["response"] * scored["response"]) \
            / scored["full"]
        assert relative(losses["full"], both) < FLOAT64
        # a prompt token's label (the token it should be; the input unchanged): the prompt and
        # full losses move, the response loss does not (it never scores that position)
        for span, b in batches.items():
            changed = {k: v.clone() for k, v in b.items()}
            if changed["labels"][0, 2] != IGNORE:
                changed["labels"][0, 2] = (changed["labels"][0, 2] + 1) % len(tokenizer)
            moved = CausalLM().losses(model, changed, torch.arange(2), 0)
            assert bool(moved[0] != losses[span][0]) == (span != "response"), span
            assert moved[1] == losses[span][1]


def test_loss_span_has_its_own_stores(tiny_chat_model, files, tmp_path, capsys):
    """The adapter is shared across spans; each span's gradients are computed for it (a store
    of another span is refused, never taken for this one's), and each is reused when asked
    again."""
    from datainf.gradients.collect import collect_gradients

    out = tmp_path / "run"
    scores = {}
    for span in ("response", "prompt", "response", "full"):
        capsys.readouterr()
        assert main(["explain-generation", "--train", files[0], "--queries", files[1],
                     "--model", tiny_chat_model, "--out", str(out), "--epochs", "1",
                     "--batch-size", "4", "--max-new-tokens", "3", "--methods", "datainf",
                     "--loss-on", span]) == 0
        said = capsys.readouterr().out
        summary = json.loads((out / "summary.json").read_text())
        assert summary["config"]["loss_on"] == span
        assert ("gradients: reused" in said) == (span in scores), (span, said)
        assert "fine-tuning: reused" in said or not scores
        matrix = np.load(out / "scores.npz")["datainf"]
        if span in scores:
            assert np.array_equal(matrix, scores[span])
        scores[span] = matrix
    assert not np.allclose(scores["prompt"], scores["response"])
    assert not np.allclose(scores["full"], scores["response"])

    from datainf.errors import DataInfError
    from datainf.models.hf import load_adapter, load_causal_lm

    base, tokenizer = load_causal_lm(tiny_chat_model)
    model = load_adapter(base, out / "adapter")
    examples = read_chat_jsonl(files[0], need_response=True, what="--train")
    encoded = encode_all(tokenizer, examples, [e.response for e in examples], max_length=256,
                         what="--train")
    with pytest.raises(DataInfError, match="made from other data"):
        collect_gradients(model, lm_batches(encoded, 4, tokenizer.pad_token_id,
                                            loss_on="prompt"), "causal_lm",
                          out=str(out / "gradients" / "train"), progress=False)


def test_formats_are_read_with_their_keys(files):
    train = read_chat_jsonl(files[0], need_response=True, what="--train")
    assert len(train) == 12 and train[0].response == "red"
    assert train[1].messages == [{"role": "user", "content": "Name a colour."}]
    assert train[1].extra == {"topic": "colour"} and train[1].chat_format
    queries = read_chat_jsonl(files[1], need_response=False, what="--queries")
    assert [q.response for q in queries] == ["light blue", "fox", None]
    assert queries[1].extra == {"id": "q2"} and queries[2].line == 3


def test_only_response_tokens_are_scored(tiny_chat_model, files):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float64).eval()
    examples = read_chat_jsonl(files[0], need_response=True, what="--train")[:2]
    encoded = encode_all(tokenizer, examples, [e.response for e in examples], max_length=128,
                         what="--train")
    # the prompt is the chat template up to the assistant's turn; the response follows it
    text = tokenizer.decode(encoded.ids[0][encoded.prompt_lengths[0]:])
    assert text.startswith("red") and "<|im_end|>" in text
    assert tokenizer.decode(encoded.ids[0][: encoded.prompt_lengths[0]]).endswith(
        "<|im_start|>assistant\n")
    batch = lm_batches(encoded, 2, tokenizer.pad_token_id)[0]
    for row, n_prompt in enumerate(encoded.prompt_lengths):
        n = len(encoded.ids[row])
        assert (batch["labels"][row, :n_prompt] == IGNORE).all()
        assert (batch["labels"][row, n_prompt:n] == batch["input_ids"][row, n_prompt:n]).all()
        assert (batch["labels"][row, n:] == IGNORE).all()
    with torch.no_grad():
        loss = response_loss(model, batch)
        # by hand, each example alone and unpadded: mean -log p(token t | tokens < t), response
        for row, n_prompt in enumerate(encoded.prompt_lengths):
            ids = torch.tensor([encoded.ids[row]])
            logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
            targets = ids[0, 1:]
            nll = -logp[torch.arange(len(targets)), targets][n_prompt - 1:]
            assert loss[row].item() == pytest.approx(nll.mean().item(), rel=1e-9)
        # a prompt token changed changes the condition, not what is scored: a response token
        # changed changes the scored likelihood
        changed = {k: v.clone() for k, v in batch.items()}
        p = encoded.prompt_lengths[0]
        changed["labels"][0, 2] = 17  # a prompt position given a label ...
        changed["labels"][0, 2] = IGNORE  # ... is always -100 again in our batches
        assert torch.equal(response_loss(model, changed), loss)
        changed["input_ids"][0, p] = changed["labels"][0, p] = 17
        assert response_loss(model, changed)[0] != loss[0]


def test_end_to_end(tiny_chat_model, files, tmp_path):
    out = tmp_path / "run"
    assert run(tiny_chat_model, *files, out, "--methods", "datainf,hessian_free,cosine",
               "--top", "3") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_train"] == 12 and summary["n_queries"] == 3
    assert summary["generated_answers"] == 1
    scores = np.load(out / "scores.npz")
    assert set(scores.files) == {"datainf", "hessian_free", "cosine"}
    assert all(scores[m].shape == (3, 12) and np.isfinite(scores[m]).all() for m in scores)
    assert np.abs(scores["cosine"]).max() <= 1 + 1e-6
    rows = [json.loads(line) for line in (out / "top.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and rows[2]["generated"] and isinstance(rows[2]["response"], str)
    for j, row in enumerate(rows):
        for method in scores.files:
            s = scores[method][j]
            helpful = [x["train"] for x in row[method]["helpful"]]
            harmful = [x["train"] for x in row[method]["harmful"]]
            # only negative scores are helpful, only positive ones harmful
            assert helpful == [i for i in np.argsort(s, kind="stable")[:3] if s[i] < 0]
            assert harmful == [i for i in np.argsort(-s, kind="stable")[:3] if s[i] > 0]
            assert [x["score"] for x in row[method]["helpful"]] == [s[i] for i in helpful]
            assert all(x["keys"]["topic"] in TOPICS for x in row[method]["helpful"])
    assert rows[1]["keys"] == {"id": "q2"}
    page = (out / "report.html").read_text()
    assert "most helpful" in page and "Cosine" in page
    # the optimizer's second moments are kept beside the adapter, one per LoRA tensor
    from datainf.training.moments import read_second_moments
    moments = read_second_moments(out / "adapter")
    assert moments and all("lora_" in name for name in moments)
    # repeated with new queries: the adapter and the training gradients are reused
    adapter = (out / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns
    queries = write_jsonl(tmp_path / "q2.jsonl", [{"prompt": "Name a colour.",
                                                   "response": "green"}])
    assert run(tiny_chat_model, files[0], queries, out, "--no-matrix") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_queries"] == 1 and "gradients" in summary["reused_stages"]
    assert "fine-tuning" in summary["reused_stages"] and not (out / "scores.npz").exists()
    assert (out / "adapter" / "adapter_model.safetensors").stat().st_mtime_ns == adapter


def test_absolute_damping_rule(tiny_chat_model, files, tmp_path):
    """--damping-rule absolute: the score matrix is DataInf's with one lambda for every block."""
    from datainf import Damping, DataInf
    from datainf.gradients.store import GradientStore

    out = tmp_path / "run"
    assert run(tiny_chat_model, *files, out, "--methods", "datainf", "--damping-rule",
               "absolute", "--damping", "1e-3") == 0
    assert json.loads((out / "summary.json").read_text())["config"]["damping_rule"] == "absolute"
    train = GradientStore.open(out / "gradients" / "train")
    queries = GradientStore.open(out / "query" / "gradients")
    expected = DataInf(Damping(absolute=1e-3)).fit(train).score(queries).numpy()
    # the job's float32 rows scored in its own batches: one float32 pass (tolerances.py)
    assert relative(np.load(out / "scores.npz")["datainf"], expected) < FLOAT32_PASS


def test_streamed_scores_equal_one_batch(tiny_chat_model, files, tmp_path):
    """Queries scored one at a time (the streaming path) give the scores of one batch."""
    from dataclasses import replace

    from datainf.gradients.store import GradientStore
    from datainf.jobs.explain_generation import Config
    from datainf.jobs.pairwise import score_queries
    from datainf.methods import Inputs

    out = tmp_path / "run"
    assert run(tiny_chat_model, *files, out, "--methods", "datainf") == 0
    train = GradientStore.open(out / "gradients" / "train")
    queries = GradientStore.open(out / "query" / "gradients")
    config = Config(methods=("datainf",), top=2)
    whole, _, _ = score_queries(Inputs(train, queries), folder=None, **config.scoring())
    (tmp_path / "m").mkdir()
    single, _, _ = score_queries(Inputs(train, queries), folder=tmp_path / "m",
                                 **replace(config, query_batch=1).scoring())
    matrix = np.load(tmp_path / "m" / "datainf.npy")
    # the same float32 rows scored in other query batches: one float32 pass (tolerances.py)
    assert relative(matrix, np.load(out / "scores.npz")["datainf"]) < FLOAT32_PASS
    assert_same_ranking([[t["helpful"][0][0]] for t in single["datainf"]],
                        [[t["helpful"][0][0]] for t in whole["datainf"]], matrix, FLOAT32_PASS)
    # without a matrix the engine's top_k gives the same lists, scores equal to rounding
    lean, _, _ = score_queries(Inputs(train, queries), folder=None, **replace(
        config, methods=("datainf", "cosine"), matrix=False).scoring())
    full, _, _ = score_queries(Inputs(train, queries), folder=tmp_path / "m",
                               **replace(config, methods=("datainf", "cosine")).scoring())
    for method in ("datainf", "cosine"):
        scores = np.load(tmp_path / "m" / f"{method}.npy")
        scale = np.abs(scores).max()
        for side in ("helpful", "harmful"):
            found, expected = ([[i for i, _ in t[side]] for t in x[method]] for x in (lean, full))
            assert_same_ranking(found, expected, scores, FLOAT32_PASS)
            for row, entries in enumerate(t[side] for t in lean[method]):
                for i, score in entries:  # each listed score is the matrix's, to rounding
                    assert abs(score - scores[row, i]) < FLOAT32_PASS * scale


@pytest.mark.parametrize("line, message", [
    ("not json", "line 2: not valid JSON"),
    ('{"text": "x"}', 'line 2: no "prompt" or "messages" key'),
    ('{"prompt": "  ", "response": "x"}', "line 2: the prompt is empty"),
    ('{"prompt": "x", "response": ""}', "line 2: the response is empty; give it a text\n"),
    ('{"prompt": "x"}', "line 2: no response"),
    ('{"messages": [{"role": "human", "content": "a"}, {"role": "gpt", "content": "b"}]}',
     "the last message's role is 'gpt': the response must come from the role 'assistant'"),
    ('{"messages": [{"role": "user"}]}', '"messages" must be a non-empty list'),
])
def test_bad_training_lines(tiny_chat_model, files, tmp_path, capsys, line, message):
    good = (tmp_path / "train.jsonl").read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([good[0], line, *good[1:]]) + "\n")
    out = tmp_path / "run"
    assert run(tiny_chat_model, str(bad), files[1], out) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "--train" in err
    assert not out.exists()


def test_too_long_is_refused_not_cut(tiny_chat_model, files, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny_chat_model, *files, out, "--max-length", "30") == 2
    err = capsys.readouterr().err
    assert "longer than --max-length 30 tokens" in err and "raise --max-length" in err
    assert not (out / "summary.json").exists() and not (out / "run.json").exists()


def test_messages_need_a_chat_template(tiny_chat_model, files, tmp_path, capsys):
    import shutil

    model = tmp_path / "no-template"
    shutil.copytree(tiny_chat_model, model)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    (model / "chat_template.jinja").unlink(missing_ok=True)
    assert run(str(model), *files, tmp_path / "run") == 2
    err = capsys.readouterr().err
    assert '"messages" need a model with a chat template' in err


def test_adapter_of_another_model_is_refused(tiny_chat_model, tiny_model, files, tmp_path,
                                             capsys):
    out = tmp_path / "first"
    assert run(tiny_chat_model, *files, out, "--methods", "datainf") == 0
    capsys.readouterr()
    assert run(tiny_model, *files, tmp_path / "second", "--adapter", str(out / "adapter")) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("datainf: error:")
    assert not (tmp_path / "second" / "summary.json").exists()


def test_only_negative_scores_help_and_only_positive_ones_harm():
    """A query that every training example helps lists none as harmful (the report says so);
    with k above half the training set the two lists stay disjoint."""
    from datainf.jobs.pairwise import _entries
    from datainf.methods import top_k_of
    from datainf.report import NONE_LISTED, _none_note

    scores = torch.tensor([[-3.0, -1.0, -2.0, -0.5], [2.0, -1.0, 0.5, 3.0]], dtype=torch.float64)
    rows = _entries(top_k_of(scores, 3))
    assert rows[0]["harmful"] == [] and [i for i, _ in rows[0]["helpful"]] == [0, 2, 1]
    assert [i for i, _ in rows[1]["harmful"]] == [3, 0, 2]
    assert [i for i, _ in rows[1]["helpful"]] == [1]
    assert NONE_LISTED["harmful"] in _none_note(rows[0], "harmful")
    assert _none_note(rows[0], "helpful") == ""


def test_lissa_convergence_is_said_on_the_console_and_the_page(tiny_chat_model, files,
                                                                tmp_path, capsys):
    out = tmp_path / "run"
    capsys.readouterr()
    assert run(tiny_chat_model, *files, out, "--methods", "lissa") == 0
    note = json.loads((out / "summary.json").read_text())["methods"]["lissa"]
    assert note["iterations"] >= 1 and note["relative_residual"] >= 0
    err, page = capsys.readouterr().err, (out / "report.html").read_text()
    said = "lissa did not converge in" in err and "its scores are approximate" in err
    assert said == (not note["converged"]) == ("did not converge: relative residual" in page)


def test_unconverged_methods_are_warned(capsys):
    from datainf.jobs.runs import warn_unconverged

    warn_unconverged({"lissa": {"converged": False, "iterations": 200,
                                "relative_residual": 0.04}, "datainf": {}})
    assert capsys.readouterr().err == (
        "datainf: warning: lissa did not converge in 200 iterations (relative residual 0.04): "
        "its scores are approximate; raise --damping, or rank by datainf or exact\n")


def test_per_token(tiny_chat_model, files, tmp_path, capsys):
    """--per-token: each attributed token of each query scored alone; the mean of a query's
    Hessian-free token scores is its score in scores.npz, to the bound that the two gradient
    computations' difference gives (the identity itself, every method, in float64:
    tests/test_tokens.py); tokens.jsonl agrees with token_scores.npz; a rerun reuses the token
    gradients. Batches of 2 queries: the token rows of queries padded to other lengths."""
    out = tmp_path / "run"
    methods = "datainf,hessian_free,cosine,less,repsim"
    assert run(tiny_chat_model, *files, out, "--methods", methods, "--top", "2",
               "--per-token", "--token-matrix", "--batch-size", "2") == 0
    scores, tokens = np.load(out / "scores.npz"), np.load(out / "token_scores.npz")
    assert set(tokens.files) == {"datainf", "hessian_free", "cosine", "less", "query",
                                 "position"}  # repsim has no per-token split
    query = tokens["query"]
    assert list(np.unique(query)) == [0, 1, 2] and (np.diff(query) >= 0).all()
    # Hessian-free: score(q, i) = -g_q . g_i, so the token mean and the whole query's score
    # differ by at most (||mean_t g_t - g_q|| + d u (||g_q|| + ||mean_t g_t||)) ||g_i||
    # (Cauchy-Schwarz, and float32 dot products of d terms, u = 2^-24), from the stores
    [folder] = {p.parent for p in out.rglob("token-gradients")}
    train, whole, by_token = (GradientStore.open(p) for p in (
        out / "gradients" / "train", folder / "gradients", folder / "token-gradients"))
    def rows(store):
        return torch.cat([store.read_block(n).double() for n in store.block_names], dim=1)
    g_train, g_query, g_tokens = rows(train), rows(whole), rows(by_token)
    owners = torch.as_tensor(query)
    g_mean = mean_by_owner(g_tokens, owners)
    token_norms = mean_by_owner(g_tokens.norm(dim=1, keepdim=True), owners)[:, 0]
    d, u = g_train.shape[1], 2.0**-24
    bound = ((g_mean - g_query).norm(dim=1) + d * u * (g_query.norm(dim=1) + token_norms)
             )[:, None] * g_train.norm(dim=1)[None, :]
    means = np.stack([tokens["hessian_free"][query == j].mean(0) for j in range(3)])
    assert (np.abs(means - scores["hessian_free"]) <= bound.numpy()).all()
    rows = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    assert [len(r["tokens"]) for r in rows] == [int((query == j).sum()) for j in range(3)]
    r = 0
    for row in rows:
        for token in row["tokens"]:
            s = tokens["datainf"][r]
            helpful = [x["train"] for x in token["datainf"]["helpful"]]
            assert helpful == [i for i in np.argsort(s, kind="stable")[:2] if s[i] < 0]
            assert token["position"] == tokens["position"][r]
            r += 1
    assert "blue" in "".join(t["token"] for t in rows[0]["tokens"])
    # the other side: each query's most helpful training examples, in order, each with a
    # score for every token of its response (the identity: tests/test_tokens.py)
    tops = [json.loads(line) for line in (out / "top.jsonl").read_text().splitlines()]
    for row, top in zip(rows, tops, strict=True):
        for method in ("datainf", "cosine", "less"):
            listed = row["training_tokens"][method]
            assert [x["train"] for x in listed] == [x["train"] for x in top[method]["helpful"]]
            for x in listed:
                assert x["tokens"] and x["response"] in "".join(t["token"] for t in x["tokens"])
                assert all(np.isfinite(t["score"]) for t in x["tokens"])
                # each token's score on each query token; their mean is its score
                assert all(len(t["by_query_token"]) == len(row["tokens"]) and
                           np.isclose(np.mean(t["by_query_token"]), t["score"], rtol=1e-12)
                           for t in x["tokens"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["per_token"]["tokens"] == len(query)
    # the same command again: the token gradients are reused
    assert run(tiny_chat_model, *files, out, "--methods", methods, "--per-token",
               "--batch-size", "2") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert "token gradients" in summary["reused_stages"]
    assert not (out / "token_scores.npz").exists()  # not asked for this time
    capsys.readouterr()
    assert run(tiny_chat_model, *files, out, "--token-matrix") == 2
    assert "add --per-token" in capsys.readouterr().err
