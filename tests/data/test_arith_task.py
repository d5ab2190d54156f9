"""Arithmetic word problems (ReFT mini-reproduction task) and the P-CoT sandbox."""
import re

import numpy as np
import pytest

from jaxllm.data.tasks import arith, sandbox


def _reference_total(question: str) -> int:
    """The answer read off the question text independently of the generator."""
    body = question.split(" has ", 1)[1].rsplit(". how many?", 1)[0]
    total = 0
    for part in body.split(", "):
        if m := re.fullmatch(r"(\d+) bags of (\d+)", part):
            total += int(m[1]) * int(m[2])
        elif m := re.fullmatch(r"(\d+) loose", part):
            total += int(m[1])
        elif m := re.fullmatch(r"lost (\d+)", part):
            total -= int(m[1])
        else:
            raise AssertionError(part)
    return total


@pytest.mark.parametrize("style", arith.STYLES)
@pytest.mark.parametrize("held_out", [False, True])
def test_gold_cot_answers_are_right_and_read_by_the_one_extractor(style, held_out):
    problems = arith.make_split(60, seed=3, held_out=held_out, style=style)
    assert len({p["question"] for p in problems}) == 60
    for p in problems:
        total = _reference_total(p["question"])
        assert arith.parse_gold(p["answer"]) == total
        assert arith.EXTRACTORS[style](p["cot"]) == total
        if style == "pcot":  # trusted gold programs: the sandbox agrees with CPython
            env = {}
            exec(p["cot"], {"__builtins__": {}}, env)
            assert env["ans"] == total


def test_held_out_combinations_never_appear_in_training():
    kinds = lambda q: tuple("bags" if "bags" in g else "lost" if "lost" in g else "loose"  # noqa: E731
                            for g in q.split(" has ", 1)[1].split(", "))
    train = {kinds(p["question"]) for p in arith.make_split(300, seed=0)}
    test = {kinds(p["question"]) for p in arith.make_split(100, seed=1, held_out=True)}
    assert test <= set(arith.TEST_COMBOS) and not train & test
    assert len(train) > 10


def test_canonical_order_is_one_of_several_valid_orders():
    p = {"question": "ann has 3 bags of 4, 6 loose. how many?"}
    assert _reference_total(p["question"]) == 18
    for cot in ("3*4=12. 12+6=18.\ntherefore: 18", "6+12=18.\ntherefore: 18", "4*3=12. 6+12=18.\ntherefore: 18"):
        assert arith.extract_answer(cot) == 18.0


def test_extractor_edge_cases():
    assert arith.extract_answer("x\ntherefore: 1,234") == 1234.0
    assert arith.extract_answer("\ntherefore: 3\ntherefore: 7") == 7.0
    assert arith.extract_answer("therefore: 3") is None  # trigger needs its newline
    assert arith.extract_answer("1+2=3.") is None
    assert arith.extract_answer("\ntherefore: abc") is None
    assert arith.extract_answer("\ntherefore: nan") is None


def test_unparseable_gold_answer_raises():
    with pytest.raises(ValueError, match="gold answer 'twelve'"):
        arith.parse_gold("twelve")
    with pytest.raises(ValueError, match="gold answer 'inf'"):
        arith.parse_gold("inf")


def test_sandbox_matches_python_on_random_arithmetic_programs():
    rng = np.random.default_rng(0)
    ops = ["+", "-", "*", "/", "//", "%"]
    for _ in range(200):
        lines, names = [], []
        for i in range(int(rng.integers(1, 5))):
            terms = [str(int(rng.integers(1, 50)))] + names
            a, b = rng.choice(terms, 2)
            lines.append(f"v{i}=({a}){rng.choice(ops)}(-{b})")
            names.append(f"v{i}")
        lines.append(f"ans={names[-1]}*2+1")
        program = "\n".join(lines)
        env = {}
        try:
            exec(program, {"__builtins__": {}}, env)
        except ZeroDivisionError:
            assert sandbox.run_program(program) is None
            continue
        assert sandbox.run_program(program) == pytest.approx(env["ans"], rel=1e-12)


@pytest.mark.parametrize("program", [
    "import os\nans=1",
    "ans=__import__('os').system('touch PWNED')",
    "ans=open('PWNED', 'w')",
    "ans=open('/etc/passwd')",
    "ans=().__class__.__bases__",
    "x=1\nans=x.real",
    "ans=[1][0]",
    "while True:\n    ans=1",
    "for i in range(10**9):\n    ans=i",
    "ans=(lambda: 1)()",
    "ans=[i for i in range(10)]",
    "ans='a'*10",
    "ans=9**9**9",
    "ans=10**100",
    "ans=2**0.5*10**20",
    "ans=1/0",
    "ans=True+1",
    "def solution():\n    return 1\nans=solution()",
    "x=" + "9*" * 500 + "9\nans=x",
    "ans=" + "(" * 300 + "1" + ")" * 300,
    "ans=y+1",
    "y=1",
    "ans=1\n" * 40,
    "ans = 1 if 1 else 2",
    "a, b = 1, 2\nans=a",
    "ans: int = 1",
    "ans=1e400",
])
def test_sandbox_refuses_malicious_or_unbounded_programs(program, tmp_path):
    program = program.replace("PWNED", str(tmp_path / "pwned"))  # the file an escape would create
    assert sandbox.run_program(program) is None
    with pytest.raises(sandbox.SandboxError):
        sandbox.evaluate(program)
    assert not (tmp_path / "pwned").exists()


def test_sandbox_cuts_the_program_at_the_first_blank_line():
    assert sandbox.run_program("a=2*3\nans=a+1\n\nimport os\nans=0") == 7.0


def test_char_tokenizer_round_trip_and_unknown_characters():
    tok = arith.CharTokenizer()
    p = arith.make_split(1, seed=0)[0]
    text = arith.prompt(p["question"]) + p["cot"]
    ids = tok.encode(text, bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and max(ids) < tok.vocab_size
    assert tok.decode(ids) == text
    with pytest.raises(ValueError, match="'#'"):
        tok.encode("1#2")
