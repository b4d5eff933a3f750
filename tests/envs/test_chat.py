"""`chat: true` (env_kwargs): every environment serves its prompts as one-message conversations for a chat model;
TRL and `route.models.evaluate` apply the model's chat template, graders and monitors read the same text as before."""

import pytest

import envs
from envs.base import prompt_text

NAMES = [n for n in envs.available_envs() if n != "coding"]  # coding's own `chat` is tested in test_coding.py


def test_every_environment_but_coding_is_covered():
    assert {"arith", "capitals", "sort", "sort_named", "repeat", "repeat_named", "qa", "qa_named"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_chat_prompts_are_the_same_rows_as_conversations_and_grade_the_same(name):
    plain, chat = envs.make_env(name, chat=False).rows(16, seed=3), envs.make_env(name, chat=True).rows(16, seed=3)
    assert all(isinstance(r["prompt"], str) for r in plain)
    assert [r["prompt"] for r in chat] == [[{"role": "user", "content": r["prompt"]}] for r in plain]
    assert [{k: v for k, v in r.items() if k != "prompt"} for r in chat] == \
           [{k: v for k, v in r.items() if k != "prompt"} for r in plain]
    env = envs.make_env(name, chat=True)
    answers = [str(r["answer"]) for r in chat]
    columns = {k: [r[k] for r in chat] for k in chat[0]}
    as_text = env.grade([r["prompt"] for r in chat], answers, **columns)
    as_messages = env.grade([r["prompt"] for r in chat], [[{"role": "assistant", "content": a}] for a in answers],
                            **columns)
    assert as_text == as_messages and all(g.solved for g in as_text)
    assert [prompt_text(r["prompt"]) for r in chat] == [r["prompt"] for r in plain]


def test_a_program_monitor_reads_the_text_of_a_chat_prompt():
    from route.monitors.systematic import ProgramDetector

    seen = []
    detector = ProgramDetector(lambda prompt, completion, row: seen.append(prompt) or False)
    row = envs.make_env("arith", chat=True).rows(1)[0]
    detector.verdicts(1, prompts=[row["prompt"]], completions=["12"], columns={"answer": [row["answer"]]})
    assert seen == [row["prompt"][0]["content"]]
