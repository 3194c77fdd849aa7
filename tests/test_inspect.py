"""``cepo inspect``: per-token weights, step-file checks and the HTML heatmap, rendered by a real Chromium."""

from __future__ import annotations

import io
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from servers import chromium

from cepo.inspect import (
    StepFormatError,
    StepNotFoundError,
    _ranges,
    cli_inspect,
    load_step,
    recorded_steps,
    render_heatmap,
    step_summary,
    token_weights,
    write_heatmap,
)

F32_MAX = float(np.finfo(np.float32).max)
L = math.log

# --------------------------------------------------------------------------------------------------------------
# token_weights


def test_token_weights_positive_advantage_by_hand():
    out = token_weights(
        0.94,
        logp_pos=[L(0.9), L(0.5), L(0.2), L(0.6)],
        logp_neg=[L(0.3), L(0.5), L(0.4), L(0.5)],
        logp_student=[L(0.6), L(0.5), L(0.1), L(0.5)],
        eps_w=0.5,
    )
    np.testing.assert_allclose(out["delta"], [L(3), 0.0, L(0.5), L(1.2)], atol=1e-12)
    # exp(Δ) = 3, 1, 0.5, 1.2 → clip to [0.5, 1.5]
    np.testing.assert_allclose(out["w_cepo"], [1.5, 1.0, 0.5, 1.2], atol=1e-12)
    # exp(logp_pos − logp_student) = 1.5, 1, 2, 1.2
    np.testing.assert_allclose(out["w_rlsd"], [1.5, 1.0, 1.5, 1.2], atol=1e-12)


def test_token_weights_negative_advantage_by_hand():
    out = token_weights(
        -0.7,
        logp_pos=[L(0.9), L(0.5), L(0.2), L(0.6)],
        logp_neg=[L(0.3), L(0.5), L(0.4), L(0.5)],
        logp_student=[L(0.6), L(0.5), L(0.1), L(0.5)],
        eps_w=0.5,
    )
    np.testing.assert_allclose(out["delta"], [L(3), 0.0, L(0.5), L(1.2)], atol=1e-12)
    # exp(−Δ) = 1/3, 1, 2, 1/1.2
    np.testing.assert_allclose(out["w_cepo"], [0.5, 1.0, 1.5, 1 / 1.2], atol=1e-12)
    # exp(−(pos − student)) = 1/1.5, 1, 0.5, 1/1.2
    np.testing.assert_allclose(out["w_rlsd"], [1 / 1.5, 1.0, 0.5, 1 / 1.2], atol=1e-12)


def test_token_weights_zero_advantage_is_one():
    out = token_weights(0.0, [L(0.9), L(0.01)], [L(0.01), L(0.9)], [L(0.5), L(0.5)], eps_w=0.2)
    np.testing.assert_allclose(out["delta"], [L(90), L(0.01 / 0.9)], atol=1e-12)
    assert out["w_cepo"] == [1.0, 1.0]
    assert out["w_rlsd"] == [1.0, 1.0]


def test_token_weights_non_finite_log_probs():
    inf = math.inf
    pos = [-inf, -inf, L(0.5), math.nan, None]
    neg = [-inf, L(0.5), -inf, L(0.5), L(0.5)]
    stu = [-inf, L(0.5), L(0.5), L(0.5), L(0.5)]
    up = token_weights(1.0, pos, neg, stu, eps_w=0.5)
    # both −inf (impossible in both contexts) and NaN: no evidence, Δ = 0; one-sided −inf: ±float32 max
    assert up["delta"] == [0.0, -F32_MAX, F32_MAX, 0.0, 0.0]
    assert up["w_cepo"] == [1.0, 0.5, 1.5, 1.0, 1.0]
    assert up["w_rlsd"] == [1.0, 0.5, 1.0, 1.0, 1.0]
    down = token_weights(-1.0, pos, neg, stu, eps_w=0.5)
    assert down["w_cepo"] == [1.0, 1.5, 0.5, 1.0, 1.0]
    assert down["w_rlsd"] == [1.0, 1.5, 1.0, 1.0, 1.0]
    flat = token_weights(0.0, pos, neg, stu, eps_w=0.5)
    assert flat["w_cepo"] == [1.0] * 5
    assert all(math.isfinite(x) for x in flat["delta"])


def test_token_weights_missing_teacher_rows_and_bad_arguments():
    assert token_weights(1.0, None, None, [0.0, -1.0], 0.5) == {"delta": None, "w_cepo": None, "w_rlsd": None}
    rlsd_only = token_weights(1.0, [L(0.9)], None, [L(0.3)], 0.5)
    assert rlsd_only["delta"] is None and rlsd_only["w_cepo"] is None
    assert rlsd_only["w_rlsd"] == [1.5]
    with pytest.raises(ValueError, match="eps_w"):
        token_weights(1.0, [0.0], [0.0], [0.0], 1.0)
    with pytest.raises(ValueError, match="logp_neg has 1 entries but logp_student has 2"):
        token_weights(1.0, [0.0, 0.0], [0.0], [0.0, 0.0], 0.5)


def test_token_weights_match_the_learner_advantages():
    """λ = 1 turns Â_t into A·w_t: the helper's weights are exactly what the learner applies."""
    import torch

    from cepo.algorithm.advantages import cepo_token_advantages, rlsd_token_advantages

    rng = np.random.default_rng(0)
    adv = [1.3, -0.8, 0.0]
    pos = rng.normal(-2.0, 1.5, size=(3, 7))
    neg = rng.normal(-2.0, 1.5, size=(3, 7))
    stu = rng.normal(-2.0, 1.5, size=(3, 7))
    pos[0, 2] = neg[0, 2] = -math.inf
    pos[1, 4] = -math.inf
    neg[0, 5] = -math.inf
    t = {name: torch.tensor(a, dtype=torch.float32) for name, a in (("pos", pos), ("neg", neg), ("stu", stu))}
    a = torch.tensor(adv)
    mask = torch.ones(3, 7)
    cepo = cepo_token_advantages(a, t["pos"], t["neg"], mask, 1.0, 0.3)
    rlsd = rlsd_token_advantages(a, t["pos"], t["stu"], mask, 1.0, 0.3)
    for row in range(3):
        # the learner runs in float32: feed the helper the same float32-rounded log-probs
        out = token_weights(
            adv[row], t["pos"][row].tolist(), t["neg"][row].tolist(), t["stu"][row].tolist(), eps_w=0.3
        )
        np.testing.assert_allclose(
            np.array(out["w_cepo"]) * adv[row], cepo[row].numpy(), rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            np.array(out["w_rlsd"]) * adv[row], rlsd[row].numpy(), rtol=1e-5, atol=1e-6
        )


# --------------------------------------------------------------------------------------------------------------
# Step records


def _row(group, correct, advantage, tokens, pos, neg, stu, *, eps_w=0.5, negative="8", scored=True):
    logp_pos = [L(p) for p in pos] if scored else None
    logp_neg = [L(p) for p in neg] if scored else None
    logp_student = [L(p) for p in stu]
    weights = token_weights(advantage, logp_pos, logp_neg, logp_student, eps_w)
    return {
        "group": group,
        "prompt": "What is 3+4? Solve step by step and put the answer in \\boxed{}.",
        "answer": "7",
        "negative": negative,
        "response": "".join(tokens),
        "reward": 1.0 if correct else 0.0,
        "correct": correct,
        "advantage": advantage,
        "scored": scored,
        "tokens": tokens,
        "logp_student": logp_student,
        "logp_pos": logp_pos,
        "logp_neg": logp_neg,
        **weights,
    }


HOSTILE = ["</script>", "<b>", "&amp;", "\n", "", "  ", "<!--", "\u2028"]


def _synthetic_step() -> dict:
    """Two scored rollouts of one group (one correct with a strongly credited "7", one wrong with a blamed "8")
    and one unscored row (A = 0) made of hostile tokens."""
    correct = _row(
        0,
        True,
        0.5,
        ["3+4", "=", "7", "\n", "\\boxed{7}"],
        pos=[0.8, 0.9, 0.9, 0.5, 0.95],
        neg=[0.7, 0.9, 0.09, 0.6, 0.9],
        stu=[0.75, 0.9, 0.3, 0.55, 0.2],
    )
    wrong = _row(
        0,
        False,
        -1.0,
        ["3+4", "=", "8", " ", "\\boxed{8}"],
        pos=[0.8, 0.9, 0.02, 0.5, 0.3],
        neg=[0.7, 0.9, 0.8, 0.5, 0.35],
        stu=[0.75, 0.9, 0.6, 0.5, 0.32],
    )
    unscored = _row(1, True, 0.0, list(HOSTILE), [], [], [0.5] * len(HOSTILE), negative=None, scored=False)
    unscored["prompt"] = "</script><script>document.title='pwned'</script> & <b>bold</b>"
    unscored["answer"] = "<i>x</i>"
    return {
        "step": 3,
        "method": "cepo",
        "lam": 0.44,
        "eps_w": 0.5,
        "policy_version": 3,
        "rollouts": [correct, wrong, unscored],
    }


def _write_steps(run_dir: Path, steps: dict[int, dict]) -> None:
    (run_dir / "steps").mkdir(parents=True, exist_ok=True)
    for step, data in steps.items():
        (run_dir / "steps" / f"step_{step:05d}.json").write_text(json.dumps(data))


def test_load_step_round_trip(tmp_path):
    data = _synthetic_step()
    _write_steps(tmp_path / "run", {3: data})
    assert load_step(tmp_path / "run", 3) == data


def test_ranges():
    assert _ranges([]) == "none"
    assert _ranges([0, 1, 2, 3, 4]) == "0-4"
    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2, 5, 7-8"


def test_load_step_missing_run_and_step(tmp_path):
    with pytest.raises(StepNotFoundError, match=r"run folder .*nope does not exist"):
        load_step(tmp_path / "nope", 0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StepNotFoundError, match="no steps/ folder"):
        load_step(tmp_path / "empty", 0)
    run = tmp_path / "x"
    _write_steps(run, {s: {"step": s, "rollouts": []} for s in range(5)})
    with pytest.raises(StepNotFoundError) as err:
        load_step(run, 7)  # the stored index 7: the 8th step
    assert str(err.value) == (
        f"step 8 was not recorded in {run} (no steps/step_00007.json); recorded steps: 1-5 "
        "(step k is the k-th training step)"
    )
    (run / "steps" / "step_00009.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"recorded steps: 1-5, 10 \(step k"):
        load_step(run, 6)
    assert recorded_steps(run) == [1, 2, 3, 4, 5, 10] and recorded_steps(tmp_path / "nope") == []


def test_load_step_length_mismatch_names_file_rollout_and_field(tmp_path):
    data = _synthetic_step()
    data["rollouts"][1]["logp_pos"] = data["rollouts"][1]["logp_pos"][:-1]
    _write_steps(tmp_path / "run", {3: data})
    with pytest.raises(StepFormatError) as err:
        load_step(tmp_path / "run", 3)
    message = str(err.value)
    assert "step_00003.json" in message
    assert "rollouts[1].logp_pos has 4 entries but tokens has 5" in message


def test_load_step_malformed(tmp_path):
    run = tmp_path / "run"
    (run / "steps").mkdir(parents=True)
    (run / "steps" / "step_00000.json").write_text('{"step": 0, "rollouts": [')
    with pytest.raises(StepFormatError, match=r"step_00000\.json: malformed JSON"):
        load_step(run, 0)
    data = _synthetic_step()
    data["rollouts"][0]["w_cepo"][2] = "big"
    data["rollouts"][2]["tokens"][1] = 7
    _write_steps(run, {1: data})
    with pytest.raises(StepFormatError, match=r"step_00001\.json: rollouts\[0\]\.w_cepo\[2\] is 'big'"):
        load_step(run, 1)
    data["rollouts"][0]["w_cepo"][2] = 1.5
    _write_steps(run, {1: data})
    with pytest.raises(StepFormatError, match=r"rollouts\[2\]\.tokens must be a list of strings"):
        load_step(run, 1)
    _write_steps(run, {2: {"step": 2, "rollouts": [{"tokens": ["a"], "logp_student": None}]}})
    with pytest.raises(StepFormatError, match=r"rollouts\[0\]\.logp_student is missing"):
        load_step(run, 2)


# --------------------------------------------------------------------------------------------------------------
# Rendering without a browser


class _Scripts(HTMLParser):
    def __init__(self):
        super().__init__()
        self.scripts: list[tuple[dict, str]] = []
        self._open: dict | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "script":
            self._open = dict(attrs)
            self.scripts.append((self._open, ""))

    def handle_data(self, data):
        if self._open is not None:
            attrs, text = self.scripts[-1]
            self.scripts[-1] = (attrs, text + data)

    def handle_endtag(self, tag):
        if tag == "script":
            self._open = None


def test_render_hostile_tokens_keep_the_page_valid():
    data = _synthetic_step()
    page = render_heatmap(data, title="run <x> & 'y'")
    # exactly the two script blocks end: no token, prompt or answer can close one early or open a comment
    assert len(re.findall(r"</script", page, flags=re.IGNORECASE)) == 2
    assert (
        "<!--" not in page
        and "<b>" not in page
        and "<i>" not in page
        and "&amp;" not in page.split("</title>")[1]
    )
    assert "\u2028" not in page
    assert "<title>run &lt;x&gt; &amp; &#x27;y&#x27;</title>" in page
    assert "http://" not in page and "https://" not in page and "@import" not in page and "url(" not in page
    parser = _Scripts()
    parser.feed(page)
    parser.close()
    assert [attrs for attrs, _ in parser.scripts] == [{"type": "application/json", "id": "cepo-data"}, {}]
    embedded = json.loads(parser.scripts[0][1])
    assert embedded["rows"][2]["tokens"] == HOSTILE
    assert embedded["rows"][2]["prompt"] == data["rollouts"][2]["prompt"]
    assert embedded["rows"][0]["w_cepo"] == data["rollouts"][0]["w_cepo"]


def test_render_non_finite_and_missing_weights():
    """-inf log-probs travel as strings (JSON has no infinities); weights the writer left out are computed."""
    data = _synthetic_step()
    row = data["rollouts"][0]
    row["logp_neg"][0] = -math.inf
    for key in ("delta", "w_cepo", "w_rlsd"):
        row[key] = None
    page = render_heatmap(data, title="t")
    parser = _Scripts()
    parser.feed(page)
    embedded = json.loads(parser.scripts[0][1])
    assert embedded["rows"][0]["logp_neg"][0] == "-Infinity"
    assert embedded["rows"][0]["delta"][0] == F32_MAX
    assert embedded["rows"][0]["w_cepo"][:3] == [1.5, 1.0, 1.5]
    assert "Infinity" not in page.replace('"Infinity"', "").replace('"-Infinity"', "").split("<script>")[0]


def test_step_summary_counts_and_clip_rates():
    summary = step_summary(_synthetic_step())
    assert summary["rollouts"] == 3 and summary["groups"] == 2
    assert (summary["correct"], summary["wrong"]) == (2, 1)
    assert (summary["scored_rows"], summary["unscored_rows"], summary["scored_tokens"]) == (2, 1, 10)
    # CEPO: the "7" and the "8" hit the clip; RLSD: "7", "\boxed{7}" and "8"
    assert summary["clip_rate_cepo"] == pytest.approx(0.2)
    assert summary["clip_rate_rlsd"] == pytest.approx(0.3)


def test_write_heatmap_default_path_and_cli(tmp_path):
    from rich.console import Console

    run = tmp_path / "myrun"
    _write_steps(run, {0: _synthetic_step(), 1: _synthetic_step()})
    path = write_heatmap(run, 1)  # the stored index 1: the 2nd step, named so
    assert path == run / "inspect" / "step_00002.html"
    assert path.read_text().startswith("<!DOCTYPE html>")
    assert "<title>CEPO token credit: myrun, step 2</title>" in path.read_text()
    assert sorted(p.name for p in path.parent.iterdir()) == ["step_00002.html"]  # no temp file left behind

    buffer = io.StringIO()
    console = Console(file=buffer, width=300)
    out = cli_inspect(run, 1, tmp_path / "elsewhere" / "page.html", console)  # the 1st step: step_00000.json
    assert out == tmp_path / "elsewhere" / "page.html" and out.is_file()
    assert str(out) in buffer.getvalue()
    assert "<title>CEPO token credit: myrun, step 1</title>" in out.read_text()

    import typer

    for bad, said in ((3, "step 3 was not recorded"), (0, "--step 0: steps count from 1")):
        buffer = io.StringIO()
        with pytest.raises(typer.Exit) as err:
            cli_inspect(run, bad, None, Console(file=buffer, width=300))
        assert err.value.exit_code == 2
        assert said in buffer.getvalue() and "recorded steps" in buffer.getvalue()
        assert ": 1-2" in buffer.getvalue()

    from typer.testing import CliRunner

    from cepo.cli import app

    # --step K is the K-th step, as the console prints it: --step 1 reads steps/step_00000.json
    done = CliRunner().invoke(app, ["inspect", "--run", str(run), "--step", "1"])
    assert done.exit_code == 0 and "step_00001.html" in done.output
    assert "myrun, step 1</title>" in (run / "inspect" / "step_00001.html").read_text()
    done = CliRunner().invoke(app, ["inspect", "--run", str(run), "--step", "9"])
    assert done.exit_code == 2 and "step 9 was not recorded" in done.output
    assert "recorded steps: 1-2" in " ".join(done.output.split())
    done = CliRunner().invoke(app, ["inspect", "--run", str(run), "--step", "0"])
    assert done.exit_code == 2 and "steps count from 1" in done.output


def test_inspect_names_the_run_by_path_or_id(tmp_path, monkeypatch):
    """--run takes a run folder or an id under --root (nested ones too, a unique prefix, the id after a
    leading runs/), and names close matches when nothing matches."""
    from typer.testing import CliRunner

    from cepo.cli import app

    root = tmp_path / "runs"
    for rel in ("cmp/cepo/seed0", "cmp/cepo/seed1", "tiny-20250101-120000"):
        folder = root / rel
        _write_steps(folder, {0: _synthetic_step(), 1: _synthetic_step()})
        (folder / "config.yaml").write_text("name: x\n")
    runner = CliRunner()

    def inspect(run: str, *more: str):
        return runner.invoke(app, ["inspect", "--run", run, "--step", "2", "--root", str(root), *more])

    for name, folder in (
        ("cmp/cepo/seed1", "cmp/cepo/seed1"),
        ("tiny-2025", "tiny-20250101-120000"),
        ("cepo/seed0", "cmp/cepo/seed0"),
        (str(root / "cmp" / "cepo" / "seed0"), "cmp/cepo/seed0"),
    ):
        page = root / folder / "inspect" / "step_00002.html"
        page.unlink(missing_ok=True)
        done = inspect(name)
        assert done.exit_code == 0, (name, done.output)
        assert page.is_file(), name
    # the default root is runs/ of the working directory; runs/<id> works as a path and as an id prefix
    monkeypatch.chdir(tmp_path)
    for name in ("cmp/cepo/seed1", "runs/cmp/cepo/seed1", "runs/tiny"):
        done = runner.invoke(app, ["inspect", "--run", name, "--step", "1"])
        assert done.exit_code == 0, (name, done.output)

    done = inspect("cmp/cepo/seed")
    assert done.exit_code == 2 and "ambiguous" in done.output
    assert "cmp/cepo/seed0, cmp/cepo/seed1" in done.output
    done = inspect("cmp/cepo/sed0")
    text = " ".join(done.output.split())
    assert (
        done.exit_code == 2 and "no run 'cmp/cepo/sed0'" in text and "close matches: cmp/cepo/seed0" in text
    )


# --------------------------------------------------------------------------------------------------------------
# The page in a real browser


class _Dom(HTMLParser):
    """Token spans (attributes and text), the cards and texts of elements with an id, from Chromium's DOM."""

    def __init__(self):
        super().__init__()
        self.toks: list[dict] = []
        self.ids: dict[str, dict] = {}
        self.cards: list[dict] = []
        self._stack: list[tuple[str, list[dict]]] = []

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        attrs["_text"] = ""
        classes = attrs.get("class", "").split()
        collectors = []
        if "tok" in classes:
            self.toks.append(attrs)
            collectors.append(attrs)
        if "card" in classes:
            self.cards.append(attrs)
        if "id" in attrs:
            self.ids[attrs["id"]] = attrs
            collectors.append(attrs)
        if tag in ("br", "meta", "input", "img", "hr", "link"):
            return
        self._stack.append((tag, collectors))

    def handle_endtag(self, tag):
        while self._stack:
            open_tag, _ = self._stack.pop()
            if open_tag == tag:
                break

    def handle_data(self, data):
        for _, collectors in self._stack:
            for node in collectors:
                node["_text"] += data


def _rgb(style: str) -> tuple[int, int, int]:
    match = re.search(r"background-color:\s*rgb\((\d+),\s*(\d+),\s*(\d+)\)", style)
    assert match, f"no rgb background in style {style!r}"
    return tuple(int(g) for g in match.groups())


PROBE = """<script>
(function () {
  const out = {};
  out.initialSort = document.getElementById("sort").value;
  out.initialOrder = Array.from(document.querySelectorAll(".card")).map(c => c.dataset.index);
  out.maxAbsDelta = Array.from(document.querySelectorAll(".card")).map(c => Number(c.dataset.maxAbsDelta));
  const spans = document.querySelectorAll('.card[data-index="0"] .toks[data-line="w_cepo"] .tok');
  spans[2].dispatchEvent(new MouseEvent("mouseover", {bubbles: true, clientX: 40, clientY: 40}));
  const tip = document.getElementById("tip");
  out.tip = tip.textContent;
  out.tipShown = getComputedStyle(tip).display;
  out.tipBg = getComputedStyle(tip).backgroundColor;
  const filter = document.getElementById("filter");
  filter.value = "wrong";
  filter.dispatchEvent(new Event("change"));
  out.hiddenWhenWrong = Array.from(document.querySelectorAll(".card.hidden")).map(c => c.dataset.index);
  filter.value = "correct";
  filter.dispatchEvent(new Event("change"));
  out.hiddenWhenCorrect = Array.from(document.querySelectorAll(".card.hidden")).map(c => c.dataset.index);
  filter.value = "all";
  filter.dispatchEvent(new Event("change"));
  const sort = document.getElementById("sort");
  sort.value = "absadv";
  sort.dispatchEvent(new Event("change"));
  out.sorted = Array.from(document.querySelectorAll(".card")).map(c => c.dataset.index);
  sort.value = "index";
  sort.dispatchEvent(new Event("change"));
  out.asSampled = Array.from(document.querySelectorAll(".card")).map(c => c.dataset.index);
  const colour = document.getElementById("colour");
  colour.value = "weight";
  colour.dispatchEvent(new Event("change"));
  const blamed = document.querySelectorAll('.card[data-index="1"] .toks[data-line="w_cepo"] .tok')[2];
  out.blamedInWeightMode = blamed.style.backgroundColor;
  colour.value = "credit";
  colour.dispatchEvent(new Event("change"));
  out.title = document.title;
  const pre = document.createElement("pre");
  pre.id = "probe";
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
})();
</script>
</body>"""


def test_heatmap_inchromium(tmp_path):
    data = _synthetic_step()
    run = tmp_path / "run"
    _write_steps(run, {3: data})
    page_path = write_heatmap(run, 3)

    # 1. the DOM after the page's script ran, plus a probe that hovers a token and works the controls
    probe_path = tmp_path / "probe.html"
    page = page_path.read_text()
    assert page.count("</body>") == 1
    probe_path.write_text(page.replace("</body>", PROBE))
    dom = _Dom()
    dom.feed(chromium("--dump-dom", probe_path.as_uri(), tmp=tmp_path).stdout)
    dom.close()

    scored = [r for r in data["rollouts"] if r["scored"]]
    unscored = [r for r in data["rollouts"] if not r["scored"]]
    expected = 2 * sum(len(r["tokens"]) for r in scored) + sum(len(r["tokens"]) for r in unscored)
    assert len(dom.toks) == expected == 28
    assert len(dom.cards) == 3

    # spans in document order: card 0 CEPO (5), card 0 RLSD (5), card 1 CEPO (5), RLSD (5), card 2 (8)
    credited = dom.toks[2]  # "7" in the correct rollout, w_cepo at the clip 1.5
    blamed = dom.toks[12]  # "8" in the wrong rollout (A < 0), w_cepo 1.5: more blame
    assert credited["_text"] == "7" and blamed["_text"] == "8"
    assert float(credited["data-w-cepo"]) == 1.5 and float(blamed["data-w-cepo"]) == 1.5
    assert float(credited["data-delta"]) == pytest.approx(L(10))
    assert float(blamed["data-delta"]) == pytest.approx(L(0.025))
    assert credited["data-w-rlsd"] == repr(data["rollouts"][0]["w_rlsd"][2])
    r, g, b = _rgb(credited["style"])
    assert g > r + 80 and g > b + 50, (r, g, b)  # green
    r, g, b = _rgb(blamed["style"])
    assert r > g + 80 and r > b + 80, (r, g, b)  # red
    assert _rgb(dom.toks[1]["style"]) == (255, 255, 255)  # "=": w = 1, white
    r, g, b = _rgb(dom.toks[3]["style"])  # "\n" in the correct rollout: w = 0.833, a light red
    assert r >= 245 and r > g + 40 and g == b > 150, (r, g, b)

    # hover text: the title attribute and the styled tooltip element
    text = credited["title"]
    assert "Δ = +2.303" in text
    assert "P_T⁺ = 0.9000" in text and "P_T⁻ = 0.0900" in text and "P_S = 0.3000" in text
    assert "w_CEPO = 1.500" in text and "w_RLSD = 1.500" in text
    assert "Δ = -3.689" in blamed["title"] and "P_T⁺ = 0.0200" in blamed["title"]
    assert "P_T⁻ = 0.8000" in blamed["title"]
    probe = json.loads(dom.ids["probe"]["_text"])
    assert probe["tip"] == credited["title"]
    assert probe["tipShown"] == "block"
    assert probe["tipBg"] != "rgba(0, 0, 0, 0)"

    # hostile tokens: rendered as text, whitespace made visible, and the page's own title untouched
    hostile = [t["_text"] for t in dom.toks[20:]]
    assert hostile == ["</script>", "<b>", "&amp;", "↵\n", "∅", "␣␣", "<!--", "\u2028"]
    assert all("style" not in t or "background-color" not in t["style"] for t in dom.toks[20:])
    assert "data-w-cepo" not in dom.toks[20]
    assert probe["title"] == "CEPO token credit: run, step 4"  # the record's step 3 counts from 0
    assert "not scored by the teacher" in dom.ids["rollouts"]["_text"]
    assert "</script><script>document.title='pwned'</script>" in dom.ids["rollouts"]["_text"]

    # header, clip rates, controls
    header = dom.ids["app"]["_text"]
    assert "method cepo" in header and "λ 0.440" in header and "ε_w 0.500" in header
    assert "step 4" in header and "step 3" not in header
    assert "rollouts 3" in header and "scored tokens 10" in header
    assert dom.ids["clip-cepo"]["_text"].endswith("20.0%")
    assert dom.ids["clip-rlsd"]["_text"].endswith("30.0%")
    assert probe["hiddenWhenWrong"] == ["0", "2"] and probe["hiddenWhenCorrect"] == ["1"]
    assert probe["sorted"] == ["1", "0", "2"]
    # the page opens on the rollout with the largest |Δ| (the blamed "8", |Δ| = 3.689), "as sampled" on demand
    assert probe["initialSort"] == "absdelta" and probe["initialOrder"] == ["1", "0", "2"]
    assert probe["maxAbsDelta"] == pytest.approx([-L(0.025), L(10), -1], abs=1e-4)
    assert probe["asSampled"] == ["0", "1", "2"]
    assert "max |Δ| = 3.689" in dom.ids["rollouts"]["_text"]
    assert re.fullmatch(r"rgb\(34, 197, 94\)", probe["blamedInWeightMode"])  # weight view: w > 1 is green

    # 2. a screenshot of the real page: both colours are on screen
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1200,2000", page_path.as_uri(), tmp=tmp_path)
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape[:2] == (2000, 1200)
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    green = (g >= 150) & (g - r >= 100) & (g - b >= 60)
    red = (r >= 180) & (r - g >= 120) & (r - b >= 120)
    assert green.sum() >= 50, f"only {green.sum()} green-dominant pixels"
    assert red.sum() >= 50, f"only {red.sum()} red-dominant pixels"


def test_heatmap_opens_on_the_largest_delta_in_chromium(tmp_path):
    """The default order is largest |Δ| first (not as sampled, not by |A|): a page whose first rollouts carry
    no evidence opens on the one that does."""
    flat = [0.5, 0.5, 0.5]
    quiet = _row(0, True, 2.0, ["1", "+", "1"], pos=flat, neg=flat, stu=flat)  # Δ = 0: an all-white row
    mild = _row(0, False, -1.0, ["1", "+", "2"], pos=[0.5, 0.5, 0.4], neg=[0.5, 0.5, 0.5], stu=flat)
    strong = _row(1, True, 0.5, ["2", "+", "2"], pos=[0.5, 0.5, 0.9], neg=[0.5, 0.5, 0.1], stu=flat)
    unscored = _row(1, False, 0.0, ["x"], [], [], [0.5], negative=None, scored=False)
    data = {
        "step": 0,
        "method": "cepo",
        "lam": 0.5,
        "eps_w": 0.5,
        "rollouts": [quiet, unscored, mild, strong],
    }
    run = tmp_path / "run"
    _write_steps(run, {0: data})
    page = write_heatmap(run, 0)
    probe = tmp_path / "probe.html"
    probe.write_text(
        page.read_text().replace(
            "</body>",
            """<script>
const pre = document.createElement("pre");
pre.id = "probe";
pre.textContent = JSON.stringify({
  sort: document.getElementById("sort").value,
  options: Array.from(document.getElementById("sort").options).map(o => o.value + "=" + o.textContent),
  order: Array.from(document.querySelectorAll(".card")).map(c => c.dataset.index),
});
document.body.appendChild(pre);
</script>
</body>""",
        )
    )
    dom = _Dom()
    dom.feed(chromium("--dump-dom", probe.as_uri(), tmp=tmp_path).stdout)
    dom.close()
    found = json.loads(dom.ids["probe"]["_text"])
    assert found["sort"] == "absdelta"
    assert found["options"] == [
        "absdelta=largest |Δ| first",
        "index=as sampled",
        "absadv=by |A|, largest first",
    ]
    assert found["order"] == ["3", "2", "0", "1"]  # |Δ| 2.20, 0.22, 0, then the unscored row
    assert "step 1" in dom.ids["app"]["_text"]
