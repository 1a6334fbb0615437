"""Tests of text_prep.py: PedCLIP's body-part excerpts (the answer parser in the spellings language models write,
the rule-based fallback on multi-region reports, for all 23 regions of pedclip.py's vocabulary), D-MLM's
knowledge and CXR-CLIP's back-translation, with tiny random transformers models and stand-in generators."""
import csv
import json
from collections import Counter

import pytest

import common
import pedclip
import text_prep as tp
from data_prep import BASE_COLUMNS


def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def read_out(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---- the body-part vocabulary, the answer parser and the rules ----

# another way a report or a model names each region (hand-written here, not read from the vocabulary)
OTHER_NAME = {"skull": "Cranium", "face": "Facial bones", "neck": "Soft tissue neck", "cervical_spine": "C-spine",
              "thoracic_spine": "T-spine", "lumbar_spine": "L-Spine", "whole_spine": "Whole spine",
              "chest": "Thorax", "abdomen": "Abdo", "pelvis": "Pelvic", "hip": "Left hip", "femur": "Right femur",
              "knee": "Left knee", "lower_leg": "Tib/Fib", "ankle": "Right ankle", "foot": "Feet",
              "shoulder": "Left shoulder", "clavicle": "Clavicles", "humerus": "Upper arm", "elbow": "Elbows",
              "forearm": "Forearm (left)", "wrist": "Wrists", "hand": "Fingers"}
# a word inside a sentence that names the region (longer phrases than another region's word included)
IN_SENTENCE = {"skull": "calvarium", "face": "mandible", "neck": "adenoids", "cervical_spine": "cervical spine",
               "thoracic_spine": "thoracic spine", "lumbar_spine": "lumbar spine", "whole_spine": "spine",
               "chest": "lungs", "abdomen": "bowel gas", "pelvis": "sacroiliac joints", "hip": "femoral neck",
               "femur": "femoral shaft", "knee": "patella", "lower_leg": "tibial shaft", "ankle": "ankle mortise",
               "foot": "metatarsals", "shoulder": "glenohumeral joint", "clavicle": "clavicle",
               "humerus": "humeral shaft", "elbow": "radial head", "forearm": "radius", "wrist": "scaphoid",
               "hand": "phalanges"}


def test_vocabulary_has_the_23_regions_and_no_word_in_two():
    assert list(pedclip.BODY_PART_WORDS) == pedclip.BODY_PARTS and len(pedclip.BODY_PARTS) == 23
    words = Counter(w for ws in pedclip.BODY_PART_WORDS.values() for w in ws)
    assert [w for w, n in words.items() if n > 1] == []
    assert sorted(OTHER_NAME) == sorted(IN_SENTENCE) == sorted(pedclip.BODY_PARTS)
    assert {p: tp.canonical_part(n) for p, n in OTHER_NAME.items()} == {p: p for p in OTHER_NAME}


def answer_lines(style):
    """One answer line per region, "text <i>." for region i, in a spelling a model writes."""
    def words(p):
        return p.replace("_", " ")
    name = {"as_is": lambda p: f"{p}:", "words": lambda p: words(p).capitalize() + ":",
            "upper": lambda p: words(p).upper() + ":", "bold": lambda p: f"**{words(p).title()}**:",
            "bullet_bold_inside": lambda p: f"- **{words(p)}:**", "numbered": lambda p: f"1. {words(p)}:",
            "other_name": lambda p: f"* {OTHER_NAME[p]}:"}[style]
    return "Here are the excerpts:\n" + "\n".join(f"{name(p)} text {i}." for i, p in enumerate(pedclip.BODY_PARTS))


@pytest.mark.parametrize("style", ["as_is", "words", "upper", "bold", "bullet_bold_inside", "numbered",
                                   "other_name"])
def test_parser_reads_each_region_in_the_spellings_models_write(style):
    got = tp.parse_bodypart_answer(answer_lines(style), pedclip.BODY_PARTS)
    assert got == {p: f"text {i}." for i, p in enumerate(pedclip.BODY_PARTS)}


def test_parser_none_missing_and_text_on_the_next_lines():
    ans = "Hip: No fracture of the femoral head.\n**Knee**: none"
    assert tp.parse_bodypart_answer(ans, ["hip", "knee"]) == {"hip": "No fracture of the femoral head.", "knee": ""}
    assert tp.parse_bodypart_answer("Hip: fine.", ["hip", "knee"]) is None  # knee missing -> the rules
    ans = "**Cervical spine:**\n- No fracture.\n- Normal alignment.\n\nLower leg: N/A\nNote: all done."
    assert tp.parse_bodypart_answer(ans, ["cervical_spine", "lower_leg"]) == {
        "cervical_spine": "No fracture. Normal alignment.", "lower_leg": ""}
    ans = "Left knee: Small effusion.\nRight knee: No fracture."  # both knees of one study: one excerpt
    assert tp.parse_bodypart_answer(ans, ["knee"]) == {"knee": "Small effusion. No fracture."}


def test_rules_keep_each_regions_findings_to_itself():
    # the report: the C-spine's sentence must not reach the knee's excerpt
    got = tp.split_report_by_rules("C-spine: No fracture. Left knee: Small joint effusion.", ["cervical_spine", "knee"])
    assert got == {"cervical_spine": "No fracture.", "knee": "Small joint effusion."}
    got = tp.split_report_by_rules("No cervical spine fracture. Small joint effusion of the left knee.",
                                   ["cervical_spine", "knee"])
    assert got == {"cervical_spine": "No cervical spine fracture.", "knee": "Small joint effusion of the left knee."}
    got = tp.split_report_by_rules("Soft tissue neck: Normal airway. Hip: The femoral neck is intact.", ["neck", "hip"])
    assert got == {"neck": "Normal airway.", "hip": "The femoral neck is intact."}  # "femoral neck" is the hip's
    parts = pedclip.BODY_PARTS  # all 23 regions in one report, under headers, then named inside the sentences
    headers = " ".join(f"{OTHER_NAME[p]}: Observation {i} is noted." for i, p in enumerate(parts))
    assert tp.split_report_by_rules("HISTORY: Fall. " + headers, parts) == {
        p: f"Observation {i} is noted." for i, p in enumerate(parts)}
    inline = " ".join(f"The {IN_SENTENCE[p]} shows observation {i}." for i, p in enumerate(parts))
    assert tp.split_report_by_rules(inline, parts) == {
        p: f"The {IN_SENTENCE[p]} shows observation {i}." for i, p in enumerate(parts)}


def test_rules_remove_history_from_every_report():
    report = ("HISTORY: Fall from bike, hip pain. Right hip: No fracture of the femoral head. Joint space "
              "preserved. Left knee: Small joint effusion. The patella is normal. No acute osseous "
              "abnormality.")
    got = tp.split_report_by_rules(report, ["hip", "knee"])
    assert got["hip"] == "No fracture of the femoral head. Joint space preserved."
    assert got["knee"] == "Small joint effusion. The patella is normal. No acute osseous abnormality."
    one = ("Clinical history: Fall on the outstretched hand, wrist pain. Comparison: None. Findings: No "
           "fracture of the distal radius. Soft tissues are normal.")
    assert tp.split_report_by_rules(one, ["wrist"]) == {"wrist": "No fracture of the distal radius. Soft "
                                                                 "tissues are normal."}
    bare = "History of asthma. The lungs are clear. Indication: cough. IMPRESSION: Normal chest."
    assert tp.split_report_by_rules(bare, ["chest"]) == {"chest": "The lungs are clear. Normal chest."}


# ---- the three steps, with tiny random models and stand-in generators ----

WORDS = ("the of and a is no to in with hip knee chest lung heart fracture normal clear effusion define give "
         "me only single paragraph short definition disease what are distinguishing radiographic signs "
         "compared other similar conditions : . , answer report").split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>", eos_token="</s>"), len(vocab)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    tok, v = tiny_tokenizer()
    d = tmp_path_factory.mktemp("tiny_gpt2")
    m = GPT2LMHeadModel(GPT2Config(vocab_size=v, n_positions=512, n_embd=16, n_layer=1, n_head=2, bos_token_id=2,
                                   eos_token_id=3, pad_token_id=0))
    m.generation_config.suppress_tokens = [0, 1, 2, 3]  # random, but always some words: never an empty answer
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def tiny_marian(tmp_path_factory):
    import torch
    from transformers import MarianConfig, MarianMTModel
    torch.manual_seed(0)
    tok, v = tiny_tokenizer()
    d = tmp_path_factory.mktemp("tiny_marian")
    MarianMTModel(MarianConfig(vocab_size=v, d_model=16, encoder_layers=1, decoder_layers=1,
                               encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                               decoder_ffn_dim=32, max_position_embeddings=128, pad_token_id=0,
                               eos_token_id=3, bos_token_id=2, decoder_start_token_id=0)).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


WRIST_REPORT = "Clinical history: fall on the outstretched hand. Findings: No fracture of the distal radius."


def text_csv(tmp_path):
    p = tmp_path / "pexr.csv"
    rep = "C-spine: no fracture. Left knee: small effusion."
    write_csv(p, BASE_COLUMNS, [
        ("a1.png", "s1", "p1", "train", "AP", "C-Spine", "", "", rep, "pexr"),
        ("a2.png", "s1", "p1", "train", "AP", "knee", "", "", rep, "pexr"),
        ("b1.png", "s2", "p2", "train", "PA", "chest", "The lung is clear.", "No disease.", "", "pexr"),
        ("c1.png", "s3", "p3", "train", "AP", "hip", "", "", "Hip: normal. Knee: normal.", "pexr"),
        ("c2.png", "s3", "p3", "train", "AP", "knee", "", "", "Hip: normal. Knee: normal.", "pexr"),
        ("d1.png", "s4", "p4", "train", "PA", "wrist", "", "", WRIST_REPORT, "pexr"),
        ("e1.png", "s5", "p5", "train", "PA", "hand", "", "", "", "pexr")])
    return p


def test_extract_bodyparts_tiny_lm_falls_back_to_rules_and_says_so(tmp_path, tiny_lm, capsys):
    p = text_csv(tmp_path)
    stats = tp.main(["extract_bodyparts", f"--csv={p}", f"--model={tiny_lm}", "--max_new_tokens=4"])
    assert stats["fallback_unparsed"] == 4 and stats["rules"] == 4 and stats["empty"] == 1  # a random LM
    assert [(r["excerpt"], r["excerpt_source"]) for r in read_out(p)] == [
        ("no fracture.", "rules"), ("small effusion.", "rules"), ("The lung is clear. No disease.", "rules"),
        ("normal.", "rules"), ("normal.", "rules"), ("No fracture of the distal radius.", "rules"), ("", "empty")]
    printed = " ".join(capsys.readouterr().out.split())
    assert "0 by the language model, 4 by the rule-based fallback (4 answers that did not parse" in printed
    assert "1 without text" in printed and "the first answer that did not parse" in printed
    assert tp.main(["extract_bodyparts", f"--csv={p}", "--rules"])["skipped_done"] == 5  # resume
    with pytest.raises(SystemExit) as e:  # no model and no --rules: the fallback is never silent
        tp.main(["extract_bodyparts", f"--csv={p}"])
    assert e.value.code == 2


def test_extract_bodyparts_asks_the_llm_for_every_report_and_resumes(tmp_path):
    p = text_csv(tmp_path)
    calls = []

    def fake_generate(prompts):
        calls.append(prompts)
        return ["- **Cervical spine**: No fracture.\n- **Knee**: Small effusion.", "Chest: The lung is clear.",
                "garbled", "wrist: No fracture of the distal radius."]
    stats = tp.extract_bodyparts(str(p), fake_generate, batch_size=8)
    assert stats["llm"] == 3 and stats["fallback_unparsed"] == 1 and len(calls) == 1 and len(calls[0]) == 4
    assert "X-rays of these body parts: cervical spine, knee." in calls[0][0]  # "C-Spine" in the CSV
    assert "X-rays of these body parts: wrist." in calls[0][3] and WRIST_REPORT in calls[0][3]
    assert "remove the medical history" in calls[0][3]  # single-part reports too (Sec. 2.1)
    rows = read_out(p)
    assert [(r["excerpt"], r["excerpt_source"]) for r in rows] == [
        ("No fracture.", "llm"), ("Small effusion.", "llm"), ("The lung is clear.", "llm"),
        ("normal.", "rules"), ("normal.", "rules"), ("No fracture of the distal radius.", "llm"), ("", "empty")]
    rows[3]["excerpt_source"] = ""  # "interrupted" before s3 was saved: only s3 is asked again
    common.write_csv_atomic(p, rows, list(rows[0].keys()))
    calls.clear()
    stats = tp.extract_bodyparts(str(p), lambda ps: calls.append(ps) or ["hip: a\nknee: b"] * len(ps))
    assert stats["skipped_done"] == 4 and len(calls[0]) == 1 and read_out(p)[3]["excerpt"] == "a"


def test_knowledge_tiny_lm_and_resume(tmp_path, tiny_lm):
    out = tmp_path / "knowledge.json"
    out.write_text(json.dumps({"Edema": {"definition": "kept", "appearance": "kept too"}}))
    tp.main(["knowledge", "--findings=Edema,Pleural_Effusion,Cardiomegaly", f"--model={tiny_lm}",
             f"--out={out}", "--max_new_tokens=6"])
    k = json.loads(out.read_text())
    assert set(k) == {"Edema", "Pleural_Effusion", "Cardiomegaly"}  # every finding asked for, no other
    assert k["Edema"] == {"definition": "kept", "appearance": "kept too"}
    for v in k.values():
        assert set(v) == {"definition", "appearance"} and all(isinstance(x, str) and x for x in v.values())
    prompts = []

    def fake_generate(ps):
        prompts.extend(ps)
        return ["Definition: A collapse." if p.startswith("Define") else
                "Radiographic characteristics: Volume loss." for p in ps]
    tp.build_knowledge(["Edema", "Pleural_Effusion", "Atelectasis"], fake_generate, str(out))
    assert len(prompts) == 2  # only Atelectasis was asked: the others were complete
    assert tp.DEFINITION_PROMPT.format(name="atelectasis") in prompts
    assert tp.APPEARANCE_PROMPT.format(name="atelectasis") in prompts
    assert json.loads(out.read_text())["Atelectasis"] == {"definition": "A collapse.",
                                                          "appearance": "Volume loss."}


def test_backtranslate_tiny_marian_and_resume(tmp_path, tiny_marian):
    p = text_csv(tmp_path)
    stats = tp.main(["backtranslate", f"--csv={p}", f"--en_it={tiny_marian}", f"--it_en={tiny_marian}",
                     "--max_new_tokens=5"])
    rows = read_out(p)
    assert stats["rows_done"] == 1 and stats["sentences"] == 2
    assert rows[2]["findings_bt"] and rows[2]["impression_bt"] and rows[0]["findings_bt"] == ""
    seen = []
    st = tp.backtranslate(str(p), lambda t: seen.extend(t) or t, lambda t: t)
    assert st["rows_skipped_done"] == 7 and seen == []
    rows[2]["impression_bt"] = ""
    common.write_csv_atomic(p, rows, list(rows[0].keys()))
    tp.backtranslate(str(p), lambda t: [s.upper() for s in t], lambda t: [s + "!" for s in t])
    rows = read_out(p)
    assert rows[2]["impression_bt"] == "NO DISEASE.!" and rows[2]["findings_bt"] != "THE LUNG IS CLEAR.!"


def test_unreadable_model_folder_is_a_user_error(tmp_path):
    p = text_csv(tmp_path)
    with pytest.raises(common.UserError, match=r"--model=.*local_files_only=True"):
        tp.main(["knowledge", "--findings=Edema", f"--model={tmp_path / 'no-such-model'}",
                 f"--out={tmp_path / 'k.json'}"])
    with pytest.raises(common.UserError, match=r"--en_it"):
        tp.main(["backtranslate", f"--csv={p}", "--en_it=nobody/no-such-model-xyz", "--it_en=x"])
