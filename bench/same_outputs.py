"""Outputs before and after a refactoring, compared byte for byte (issue 20: behaviour unchanged).

    python bench/same_outputs.py save runs/same/before [--model DIR --src FILE]...
    (change the code)
    python bench/same_outputs.py check runs/same/before

`save` records, in DIR/outputs.json:
- every context mode x attention x cell x input feeding x copy as a small seeded random model: a digest of
  the bytes of its teacher-forced scores, of its step-by-step scores over the same target, and of its
  training loss on a seeded random batch (fp32, one thread: the same arithmetic gives the same bytes);
- for each --model and its --src file: a digest of the translations at beam 1 and beam 5 over the whole
  vocabulary (decoding.shortlist 0), and with the model's shortlist when it has one; with the shortlist also
  how many of the first 300 lines decode to the same text alone (batch_size 1) as in their batch.
`check` computes the same in this checkout and names every entry that differs; exit 1 if any does.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch

from seqtool.checkpoint import load_model
from seqtool.config import ModelConfig
from seqtool.model.seq2seq import build_model
from seqtool.translate import Translator

CELLS = ("gru", "lstm", "rnn")
ALONE = 300  # lines also decoded one at a time with the shortlist
MODES = [("init", "bahdanau", False), ("every_step", "bahdanau", False), ("attention", "bahdanau", False),
         *(("attention", kind, feed) for kind in ("luong_dot", "luong_general", "luong_concat")
            for feed in (False, True))]


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().float().numpy().tobytes()).hexdigest()[:16]


def random_models() -> dict[str, str]:
    out = {}
    for cell, (context, attention, feed), copy in itertools.product(CELLS, MODES, (False, True)):
        if copy and context != "attention":
            continue
        name = f"{cell}/{context}/{attention}{'/feed' if feed else ''}{'/copy' if copy else ''}"
        cfg = ModelConfig(cell=cell, context=context, attention=attention, input_feeding=feed, copy_source=copy,
                          embedding_size=16, encoder_hidden_size=16, hidden_size=32, encoder_layers=2,
                          decoder_layers=2, dropout=0.0)
        torch.manual_seed(0)
        model = build_model(cfg, 40, 40).eval()
        src = torch.randint(3, 40, (3, 7))
        src_lens = torch.tensor([7, 5, 2])
        tgt_in = torch.randint(3, 40, (3, 6))
        with torch.no_grad():
            forced = model(src, src_lens, tgt_in)
            state, steps = model.encode(src, src_lens), []
            for t in range(tgt_in.size(1)):
                scores, state, _ = model.step(tgt_in[:, t], state)
                steps.append(scores)
            loss = model(src, src_lens, tgt_in, torch.randint(3, 40, (3, 6)), label_smoothing=0.1)
        out[name] = f"{digest(forced)} {digest(torch.stack(steps, 1))} {digest(loss)}"
    return out


def translations(model_dir: Path, src: Path) -> dict[str, str]:
    bundle = load_model(model_dir)
    lines = src.read_text(encoding="utf-8").splitlines()
    out = {}
    for beam, shortlist in itertools.product((1, 5), (0, bundle.config.decoding.shortlist)):
        if shortlist and bundle.shortlist is None or (shortlist == 0 and f"{beam}/0" in out):
            continue
        decoding = bundle.config.decoding.model_copy(update={"beam_size": beam, "shortlist": shortlist,
                                                             "quantize": False, "nbest": 1})
        translator = Translator(bundle.model, bundle.src_tok, bundle.tgt_tok, decoding, bundle.config.data.truncate_src,
                                shortlist=bundle.shortlist)
        texts = [t.text for t in translator.translate(lines)]
        key = f"{model_dir}:{src.name}/beam{beam}/shortlist{shortlist}"
        out[key] = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
        if shortlist:  # a line's output must not depend on its batch: each of the first ALONE lines on its own
            single = replace(translator, decoding=decoding.model_copy(update={"batch_size": 1}))
            same = sum(single.translate([line])[0].text == text for line, text in zip(lines[:ALONE], texts))
            out[key + f"/alone_equal_of_{min(ALONE, len(lines))}"] = str(same)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=("save", "check"))
    ap.add_argument("dir", type=Path)
    ap.add_argument("--model", type=Path, action="append", default=[])
    ap.add_argument("--src", type=Path, action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.action == "save":
        if len(args.model) != len(args.src):
            sys.exit("give one --src per --model")
        pairs = [[str(m), str(s)] for m, s in zip(args.model, args.src)]
    else:
        saved = json.loads((args.dir / "outputs.json").read_text())
        pairs = saved["models"]
    now = random_models()
    for model, src in pairs:
        now.update(translations(Path(model), Path(src)))
    if args.action == "save":
        args.dir.mkdir(parents=True, exist_ok=True)
        (args.dir / "outputs.json").write_text(json.dumps({"models": pairs, "digests": now}, indent=1))
        print(f"{len(now)} digests saved to {args.dir / 'outputs.json'}")
        return
    differ = [k for k in saved["digests"] if now.get(k) != saved["digests"][k]]
    for k in differ:
        print(f"differs: {k}: {saved['digests'][k]} -> {now.get(k)}")
    for k in now.keys() - saved["digests"].keys():
        print(f"new: {k}: {now[k]}")
    print(f"{len(saved['digests']) - len(differ)} of {len(saved['digests'])} the same")
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
