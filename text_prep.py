"""
text_prep.py: the three text steps of the papers that need a language model, on a CSV that data_prep.py wrote.
Each runs a local Hugging Face model (a folder, or a name already in the cache; nothing is downloaded),
saves as it goes and skips what is done: rerun an interrupted run.

    python text_prep.py extract_bodyparts --csv=data/pexr.csv --model=<Llama-3.1-8B-Instruct folder>
    python text_prep.py knowledge --findings=data/mimic_cxr.csv --model=<local LLM>   # -> data/knowledge.json
    python text_prep.py backtranslate --csv=data/mimic_cxr.csv --en_it=<opus-mt-en-it> --it_en=<opus-mt-it-en>

extract_bodyparts  PedCLIP's body-part excerpt (doi:10.1007/978-3-032-04971-1_46, Sec. 2.1) -> columns
                   `excerpt` and `excerpt_source` (llm / rules / empty). The body parts are pedclip.py's 23
                   regions, their other spellings mapped onto them (BODY_PART_WORDS). An answer that does not
                   parse falls back to a rule-based excerpt, which is not the paper's step: the counts of each
                   source are printed, and `--rules` (no model at all) has to be asked for.
knowledge          D-MLM's definition and radiographic appearance of each finding (arXiv:2507.21794, Sec. 2.1)
                   -> a JSON file that dmlm.py --knowledge reads.
backtranslate      CXR-CLIP's English -> Italian -> English augmentation (doi:10.1007/978-3-031-43895-0_10,
                   Sec. 3.2) -> columns `findings_bt` / `impression_bt`.
"""
from __future__ import annotations

import argparse
import csv
import inspect
import json
import os
import re
from collections import Counter, defaultdict
from pathlib import Path

from tqdm import tqdm

import common
from data_prep import report_text
from pedclip import BODY_PART_SYNONYMS, BODY_PART_WORDS

LP = common.LABEL_PREFIX


# ----------------------------------------------------------------------------------------------------
# ---- local Hugging Face models ----

def load_hf(kind: str, name: str, flag: str):
    """(tokenizer, model) from a local folder or the local cache only; a UserError saying what to pass."""
    import transformers

    cls = {"causal": transformers.AutoModelForCausalLM, "seq2seq": transformers.AutoModelForSeq2SeqLM}[kind]
    try:
        tok = transformers.AutoTokenizer.from_pretrained(name, local_files_only=True)
        model = cls.from_pretrained(name, local_files_only=True).eval()
    except (OSError, ValueError, ImportError) as e:
        raise common.UserError(
            f"{flag}={name}: cannot load a {kind} model from local files (local_files_only=True; nothing is "
            f"downloaded here): {type(e).__name__}: {str(e).splitlines()[0][:160]}. Pass a folder with "
            f"config.json, weights and tokenizer files, or a name in the Hugging Face cache") from None
    if kind == "causal":
        tok.padding_side = "left"  # generation continues from the right end of every prompt
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
    return tok, model


def make_generate(tok, model, max_new_tokens: int):
    """prompts -> answers, greedy; through the chat template where the tokenizer has one (instruct models)."""
    import torch

    def generate(prompts: list[str]) -> list[str]:
        if getattr(tok, "chat_template", None):
            prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        enc = tok(prompts, return_tensors="pt", padding=True, truncation=True,
                  max_length=limit - max_new_tokens)
        enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        return [s.strip() for s in tok.batch_decode(new, skip_special_tokens=True)]
    return generate


def make_translate(tok, model, max_new_tokens: int):
    import torch

    def translate(texts: list[str]) -> list[str]:
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=512)
        enc = {k: v.to(model.device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, num_beams=1, do_sample=False)
        return [s.strip() for s in tok.batch_decode(out, skip_special_tokens=True)]
    return translate


def read_csv_rows(path: str) -> tuple[list[dict], list[str]]:
    if not os.path.isfile(path):
        raise common.UserError(f"--csv={path} does not exist")
    with open(path, newline="", encoding="utf-8") as f:
        rd = csv.DictReader(f)
        return [dict(r) for r in rd], list(rd.fieldnames or [])


def batches(items: list, n: int):
    for i in range(0, len(items), n):
        yield items[i:i + n]


# ----------------------------------------------------------------------------------------------------
# ---- PedCLIP body-part excerpts (Sec. 2.1, Fig. 2) ----

# One prompt does both LLM steps of Sec. 2.1, for every report, one body part or several: drop the history and
# other context, then copy out the text of each body part's X-ray.
BODYPART_PROMPT = (
    "You are given the radiology report of one case with X-rays of these body parts: {parts}.\n"
    "First remove the medical history, the clinical indication, comparisons with earlier studies and any "
    "other context that is not an imaging finding. Then, for each body part, copy the remaining sentences of "
    "the report that describe that body part's X-ray.\n"
    "Answer with exactly one line per body part, in the form '<body part>: <text>', and nothing else. "
    "Write 'none' if the report says nothing about a body part.\n\n"
    "Report:\n{report}\n\nAnswer:\n")


def canonical_part(name: str) -> str:
    """A body part as a CSV or a language model spells it -> its region in pedclip.BODY_PARTS, else the name
    in lower case: "cervical_spine", "Cervical spine", "**C-Spine**", "Left knee", "Tib/Fib (left)" ->
    cervical_spine, knee, lower_leg."""
    k = re.sub(r"\([^)]*\)|[*`#]", " ", name).lower()
    k = re.sub(r"[\s_\-]+", "_", k).strip("_")
    k = re.sub(r"^(left|right|bilateral|both)_", "", k)
    return k if k in BODY_PART_WORDS else BODY_PART_SYNONYMS.get(k, k)


WORD_PART = {w: p for p, ws in BODY_PART_WORDS.items() for w in ws}
# a region's word or phrase as a whole word, plural allowed; the longest first, so that "femoral neck" is read
# as one phrase (the hip's) and never as "femoral" + the neck's "neck"
PART_WORD_RE = re.compile(r"\b(" + "|".join(map(re.escape, sorted(WORD_PART, key=len, reverse=True)))
                          + r")(?:e?s)?\b")
# a header starts a line or follows the end of a sentence: "HISTORY: ... C-spine: ... LEFT KNEE: ..."
HEADER_RE = re.compile(r"(?:^|(?<=[.!?])[ \t]+)\s*([A-Za-z][A-Za-z ,/()\-]{1,39}):\s*", re.MULTILINE)
# the context that Sec. 2.1 removes: under these headers, or a sentence that opens with one of the words
CONTEXT_RE = re.compile(r"histor|indication|clinical|comparison|technique|reason|request|referr|procedure|"
                        r"exam", re.IGNORECASE)
CONTEXT_SENTENCE_RE = re.compile(r"^(clinical |medical |patient )?(history|indication|comparison|reason for)"
                                 r"\b", re.IGNORECASE)


def parts_named(text: str, parts: list[str]) -> list[str]:
    """The parts among `parts` that `text` names with one of their words (a part outside the vocabulary: with
    its own name)."""
    t = text.lower()
    named = {WORD_PART[m[1]] for m in PART_WORD_RE.finditer(t)}
    return [p for p in parts if p in named or (p not in BODY_PART_WORDS and
                                               re.search(r"\b" + re.escape(p.replace("_", " ")), t))]


def split_report_by_rules(report: str, parts: list[str]) -> dict[str, str]:
    """The fallback when the language model's answer does not parse: the rule-based excerpt of each body part.

    History, indication, comparison and similar sections are dropped, and so is a sentence that opens with
    such a word ("History of asthma."). A header naming body parts ("C-spine:", "Left knee:") makes them
    current; other headers ("FINDINGS:") make the text general. A sentence naming parts goes to them and makes
    them current; any other sentence goes to the current parts, or to every part when the text is general."""
    out: dict[str, list[str]] = {p: [] for p in parts}
    pieces, last = [], 0
    for m in HEADER_RE.finditer(report):
        pieces += [(None, report[last:m.start()]), (m[1], "")]
        last = m.end()
    pieces.append((None, report[last:]))
    current: list[str] | None = []  # [] general, None inside a context section
    for header, text in pieces:
        if header is not None:
            named = parts_named(header, parts)
            current = named if named else None if CONTEXT_RE.search(header) else []
            continue
        if current is None:
            continue
        for s in common.split_sentences(text):
            if CONTEXT_SENTENCE_RE.match(s):
                continue
            named = parts_named(s, parts)
            current = named or current
            for p in current or parts:
                out[p].append(s)
    return {p: " ".join(v) for p, v in out.items()}


# "<part>: <text>" as models write it: "cervical_spine: ...", "- **Lower leg**: ...", "1. Knee: ...",
# "**Hip:** ..."
ANSWER_LINE = re.compile(r"^\s*(?:[-*+\u2022]\s+|\d{1,2}[.)]\s+)?([^:]{1,60}?)\s*:\s*(.*)$")
NONE_ANSWERS = ("none", "n/a", "na", "not mentioned", "not described")


def parse_bodypart_answer(answer: str, parts: list[str]) -> dict[str, str] | None:
    """'<part>: <text>' lines -> {part: text}; None (then the rules) unless every asked part has a line.

    A part is read in any spelling canonical_part knows; a line "<part>:" with nothing after it takes the
    lines below it up to a blank line; two lines of one part ("Left knee: ...", "Right knee: ...") are
    joined."""
    got: dict[str, list[str]] = {}
    cur = None
    for line in answer.splitlines():
        m = ANSWER_LINE.match(line)
        part = canonical_part(m[1]) if m else None
        if part in parts:
            got.setdefault(part, [])
            txt = m[2].strip().strip("*").strip()
            cur = part if not txt else None
            if txt and txt.lower().rstrip(".") not in NONE_ANSWERS:
                got[part].append(txt)
        elif not line.strip() or m:
            cur = None
        elif cur is not None:
            got[cur].append(re.sub(r"^\s*(?:[-*+\u2022]\s+)?", "", line).strip())
    return {p: " ".join(got[p]) for p in parts} if all(p in got for p in parts) else None


def extract_bodyparts(csv_path: str, generate, batch_size: int = 8, save_every: int = 10) -> dict:
    """Write `excerpt` and `excerpt_source` (llm / rules / empty) on every row, one study at a time.

    Every study with text goes to the LLM, one body part or several (Sec. 2.1 removes the history from every
    report); an answer that does not parse, or generate=None (--rules), falls back to the rules. The text is a
    row's `report`, else its findings + impression; `body_part` in any spelling pedclip.py maps onto its 23
    regions. Studies whose rows all have an `excerpt_source` are skipped, so an interrupted run continues
    where it stopped. Prints the count of studies per source."""
    rows, cols = read_csv_rows(csv_path)
    cols += [c for c in ("excerpt", "excerpt_source") if c not in cols]
    studies = defaultdict(list)
    for i, r in enumerate(rows):
        studies[r.get("study_id") or f"row{i}"].append(i)
    todo = [s for s, ii in studies.items() if any(not rows[i].get("excerpt_source") for i in ii)]
    stats, unparsed = Counter(skipped_done=len(studies) - len(todo)), []

    def part(i):
        return canonical_part(rows[i].get("body_part") or "") or "unknown"

    def text(i):
        r = rows[i]
        return (r.get("report") or report_text(r.get("findings", ""), r.get("impression", ""))).strip()

    groups = list(batches(todo, batch_size))
    for b, group in enumerate(tqdm(groups, desc="body-part excerpts", dynamic_ncols=True)):
        info = [(studies[s], sorted({part(i) for i in studies[s]}), text(studies[s][0])) for s in group]
        asks = [k for k, (_, _, t) in enumerate(info) if t]
        prompts = [BODYPART_PROMPT.format(parts=", ".join(p.replace("_", " ") for p in info[k][1]),
                                          report=info[k][2]) for k in asks]
        answers = dict(zip(asks, generate(prompts))) if generate and asks else {}
        for k, (ii, parts, t) in enumerate(info):
            got, src = ({}, "empty") if not t else (parse_bodypart_answer(answers.get(k, ""), parts), "llm")
            if t and got is None:
                got, src = split_report_by_rules(t, parts), "rules"
                stats["fallback_unparsed" if k in answers else "rules_no_model"] += 1
                unparsed += [answers[k]] if k in answers else []
            stats[src] += 1
            for i in ii:
                rows[i]["excerpt"], rows[i]["excerpt_source"] = got.get(part(i), ""), src
        if (b + 1) % save_every == 0:
            common.write_csv_atomic(csv_path, rows, cols)
    common.write_csv_atomic(csv_path, rows, cols)
    print(f"extract_bodyparts: {len(todo)} studies -> {csv_path}: {stats['llm']} by the language model, "
          f"{stats['rules']} by the rule-based fallback ({stats['fallback_unparsed']} answers that did not "
          f"parse, {stats['rules_no_model']} with --rules), {stats['empty']} without text (empty); "
          f"{stats['skipped_done']} done before")
    if unparsed:
        print(f"  the first answer that did not parse: {' '.join(unparsed[0].split())[:200]!r}")
    return dict(stats)


# ----------------------------------------------------------------------------------------------------
# ---- D-MLM knowledge: definition and appearance of each finding (Sec. 2.1, the paper's two prompts) ----

DEFINITION_PROMPT = "Define {name}. Give me only a single paragraph and short definition of the disease."
APPEARANCE_PROMPT = ("What are the distinguishing radiographic signs of {name} compared to other similar "
                     "conditions?")


def clean_answer(text: str, prefix: str) -> str:
    """Strip the answer's own heading ("Definition: ...", "Radiographic characteristics: ...")."""
    t = " ".join(text.split())
    return re.sub(r"^\**\s*" + prefix + r"\s*\**\s*:\s*\**\s*", "", t, flags=re.I).strip()


def finding_names(spec: str) -> list[str]:
    """--findings: a CSV (its label:<Name> columns), a text file (one per line) or a comma-separated list."""
    if spec.lower().endswith((".csv", ".txt")) and not os.path.isfile(spec):
        raise common.UserError(f"--findings={spec} does not exist")
    if spec.endswith(".csv"):
        with open(spec, newline="", encoding="utf-8") as f:
            names = [c[len(LP):] for c in next(csv.reader(f), []) if c.startswith(LP)]
    elif os.path.isfile(spec):
        names = [ln.strip() for ln in Path(spec).read_text().splitlines() if ln.strip()]
    else:
        names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise common.UserError(f"--findings={spec}: no finding named (a CSV needs label:<Name> columns)")
    return names


def build_knowledge(names: list[str], generate, out_path: str, batch_size: int = 8) -> dict:
    """{"<Finding>": {"definition": ..., "appearance": ...}}, written after every batch; findings already
    complete in out_path are kept (resume). Label names go into the prompts as words (common.label_text)."""
    know = json.loads(Path(out_path).read_text()) if os.path.exists(out_path) else {}
    todo = [n for n in names if not (know.get(n, {}).get("definition") and know.get(n, {}).get("appearance"))]
    stats = Counter(skipped_done=len(names) - len(todo))

    def save():
        common.atomic_write(out_path, lambda f: json.dump(know, f, indent=2))

    for group in tqdm(list(batches(todo, batch_size)), desc="knowledge", dynamic_ncols=True):
        words = [common.label_text(n) for n in group]
        defs = generate([DEFINITION_PROMPT.format(name=w) for w in words])
        apps = generate([APPEARANCE_PROMPT.format(name=w) for w in words])
        for n, d, a in zip(group, defs, apps):
            d, a = clean_answer(d, "definition"), clean_answer(a, "radiographic characteristics")
            if d and a:
                know[n] = {"definition": d, "appearance": a}
            stats["done" if d and a else "empty_answer"] += 1  # an empty answer is asked again on a rerun
        save()
    save()
    print(f"knowledge: {dict(stats)} -> {out_path}")
    return dict(stats)


# ----------------------------------------------------------------------------------------------------
# ---- CXR-CLIP back-translation, English -> Italian -> English (Sec. 3.2, the text augmentation) ----

def backtranslate(csv_path: str, en_it, it_en, columns=("findings", "impression"), batch_size: int = 32,
                  rows_per_chunk: int = 512) -> dict:
    """Fill <column>_bt. Sentence by sentence: translation models are trained on sentences, and report
    sentences repeat ("No pneumothorax."), so each distinct sentence of a chunk of rows is translated once.
    Rows whose <column>_bt is filled are skipped (resume); the CSV is saved after every chunk. An empty
    translation keeps the original sentence (counted), so a non-empty text never gets an empty _bt."""
    rows, cols = read_csv_rows(csv_path)
    for c in columns:
        if c not in cols:
            raise common.UserError(f"backtranslate: {csv_path}: no column {c!r}")
    cols += [c + "_bt" for c in columns if c + "_bt" not in cols]

    def pending(r, c):
        return r.get(c, "").strip() and not r.get(c + "_bt")

    todo = [i for i, r in enumerate(rows) if any(pending(r, c) for c in columns)]
    stats = Counter(rows_skipped_done=len(rows) - len(todo))
    for chunk in tqdm(list(batches(todo, rows_per_chunk)), desc="back-translation", dynamic_ncols=True):
        sents = sorted({s for i in chunk for c in columns if pending(rows[i], c)
                        for s in common.split_sentences(rows[i][c])})
        back = {}
        for group in batches(sents, batch_size):
            it = en_it(group)
            for s, t in zip(group, it_en([t or s for t, s in zip(it, group)])):
                stats["empty_translation"] += not t
                back[s] = t or s
        for i in chunk:
            for c in columns:
                if pending(rows[i], c):
                    rows[i][c + "_bt"] = " ".join(back[s] for s in common.split_sentences(rows[i][c]))
        stats["rows_done"] += len(chunk)
        stats["sentences"] += len(sents)
        common.write_csv_atomic(csv_path, rows, cols)
    print(f"backtranslate: {dict(stats)}")
    return dict(stats)


# ----------------------------------------------------------------------------------------------------
# ---- CLI ----

def generation_args(p, batch_size: int):  # what each step passes to generate()
    p.add_argument("--batch_size", type=int, default=batch_size, help="texts per generate() call")
    p.add_argument("--max_new_tokens", type=int, default=256, help="the longest answer, in tokens")


def build_parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    ap = argparse.ArgumentParser(prog="text_prep.py", description=__doc__, formatter_class=raw)
    sub = ap.add_subparsers(dest="command", required=True, metavar="<text step>")
    p = sub.add_parser("extract_bodyparts", help="PedCLIP Sec. 2.1: the body-part excerpt of every report",
                       description=inspect.cleandoc(extract_bodyparts.__doc__), formatter_class=raw)
    p.add_argument("--csv", required=True, help="a CSV in the schema, rewritten with excerpt, excerpt_source")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--model", default="", help="a local causal LM, folder or cached name (the paper)")
    how.add_argument("--rules", action="store_true", help="no model: the rule-based fallback everywhere")
    generation_args(p, 8)
    p = sub.add_parser("knowledge", help="D-MLM Sec. 2.1: definition and appearance of each finding -> JSON",
                       description=inspect.cleandoc(build_knowledge.__doc__), formatter_class=raw)
    p.add_argument("--findings", required=True, help="a CSV (its label columns), a text file or 'A,B,C'")
    p.add_argument("--model", required=True, help="a local causal LM (folder or cached name)")
    p.add_argument("--out", default="data/knowledge.json",
                   help="the JSON to write, kept and completed when it exists (default: %(default)s)")
    generation_args(p, 8)
    p = sub.add_parser("backtranslate", help="CXR-CLIP Sec. 3.2: EN -> IT -> EN, into findings_bt / _bt",
                       description=inspect.cleandoc(backtranslate.__doc__), formatter_class=raw)
    p.add_argument("--csv", required=True, help="a CSV with findings, impression; rewritten with _bt added")
    p.add_argument("--en_it", required=True, help="English -> Italian model, e.g. Helsinki-NLP/opus-mt-en-it")
    p.add_argument("--it_en", required=True, help="Italian -> English model, e.g. Helsinki-NLP/opus-mt-it-en")
    generation_args(p, 32)
    return ap


def main(argv: list[str] | None = None):
    args = build_parser().parse_args(argv)
    if getattr(args, "csv", "") and not os.path.isfile(args.csv):  # before a model is loaded
        raise common.UserError(f"--csv={args.csv} does not exist")
    if args.command == "extract_bodyparts":
        gen = None if args.rules else make_generate(*load_hf("causal", args.model, "--model"),
                                                    args.max_new_tokens)
        return extract_bodyparts(args.csv, gen, args.batch_size)
    if args.command == "knowledge":
        names = finding_names(args.findings)
        gen = make_generate(*load_hf("causal", args.model, "--model"), args.max_new_tokens)
        return build_knowledge(names, gen, args.out, args.batch_size)
    en_it = make_translate(*load_hf("seq2seq", args.en_it, "--en_it"), args.max_new_tokens)
    it_en = make_translate(*load_hf("seq2seq", args.it_en, "--it_en"), args.max_new_tokens)
    return backtranslate(args.csv, en_it, it_en, batch_size=args.batch_size)


if __name__ == "__main__":
    common.cli(main)
