"""The tag grammar shared by the loop and the trainer: prompts, action parsing, stop sequences, escaping."""
from __future__ import annotations

import re
from typing import Callable, Sequence

from .types import Action

GRAMMAR_VERSION = 1
ACTION_TAGS = ("image_search", "text_search", "answer")
# Generation stops right after an action closes: the loop then acts on it.
STOP = tuple(f"</{t}>" for t in ACTION_TAGS)

SYSTEM = (
    "You answer questions about images by searching a knowledge base. Each turn, think briefly inside "
    "<think>...</think>, then do exactly one action:\n"
    "<image_search>N</image_search> finds the entity shown in input image N;\n"
    "<text_search>query</text_search> searches text passages;\n"
    "<answer>short answer</answer> gives the final answer and ends.\n"
    "Search results come back inside <information>...</information>. Answer with a short name, number or date.\n"
    "\nExample:\n"
    '<image n="1">looks like: tower (0.60)</image>\nQuestion: Who designed the building shown?\n'
    "<think>I must identify the building first.</think><image_search>1</image_search>\n"
    "<information>\n[1] Eiffel Tower (image match 0.91): The Eiffel Tower is a lattice tower in Paris.\n</information>\n"
    "<think>Now search for its designer.</think><text_search>Eiffel Tower designer</text_search>\n"
    "<information>\n[1] Eiffel Tower: It was designed by the company of Gustave Eiffel.\n</information>\n"
    "<think>The passage names the designer.</think><answer>Gustave Eiffel</answer>"
)

LAST_TURN = "No turns left: give your answer now from what you have read."
CORRECTION = ("Your last turn had no valid action. Reply with <think>...</think> and then exactly one of "
              "<image_search>N</image_search>, <text_search>query</text_search> or <answer>...</answer>.")

_ESC = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}
_ACTION_RE = re.compile(r"<(image_search|text_search|answer)>(.*?)</\1>", re.S)
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.S)


def escape(text: str) -> str:
    """Escape retrieved or perceived text so a tag inside it can never act as one.

    >>> escape("a <answer>x</answer> & b")
    'a &lt;answer&gt;x&lt;/answer&gt; &amp; b'
    """
    return "".join(_ESC.get(c, c) for c in text)


MAX_QUESTION_CHARS = 2000


def check_question(question, where: str = "the question") -> str:
    """A question's text, or InputError when it is not text, empty, or longer than MAX_QUESTION_CHARS.

    >>> check_question("  <image> What is this?  ")
    '<image> What is this?'
    """
    from .errors import InputError

    if not isinstance(question, str):
        raise InputError(f"{where} is not text ({type(question).__name__})", fix="give the question as a string")
    text = question.strip()
    if not text.replace("<image>", "").strip():
        raise InputError(f"{where} is empty", fix='ask something, e.g. "What is the capital of this country?"')
    if len(text) > MAX_QUESTION_CHARS:
        raise InputError(f"{where} is {len(text):,} characters long, over the limit of {MAX_QUESTION_CHARS:,}",
                         fix="shorten it: one question about the image(s), not a document")
    return text


def unescape(text: str) -> str:
    """Undo `escape` in an action's argument (the policy copies titles as it read them).

    >>> unescape("AT&amp;T &lt;b&gt;")
    'AT&T <b>'
    """
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def image_block(n: int, perception: str) -> str:
    """How input image n is shown to the policy.

    >>> image_block(1, "labels: tower")
    '<image n="1">labels: tower</image>'
    """
    return f'<image n="{n}">{escape(perception)}</image>'


def user_message(question: str, perceptions: Sequence[str]) -> str:
    """The user turn: every input image as perception text, then the question."""
    blocks = "\n".join(image_block(i, p) for i, p in enumerate(perceptions, 1))
    q = question.replace("<image>", "").strip()
    return f"{blocks}\nQuestion: {escape(q)}" if blocks else f"Question: {escape(q)}"


def messages(question: str, perceptions: Sequence[str]) -> list[dict]:
    """Chat messages of an episode's opening (system + user)."""
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user_message(question, perceptions)}]


def system_prefix(render: Callable[[Sequence[dict]], str]) -> str:
    """The rendered text every episode's prompt starts with (chat template + system prompt + the user turn's
    opening), whatever the question: what a backend can cache once.

    >>> system_prefix(render_chatml).endswith("<|im_start|>user\\n")
    True
    """
    a, b = render(messages("a", [])), render(messages("b", []))
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:a.rfind("\n", 0, n) + 1]  # end on a line break: tokens never merge across it


def information(lines: Sequence[str]) -> str:
    """An <information> block written by the loop (already escaped), on its own lines."""
    body = "\n".join(lines) if lines else "no results"
    return f"\n<information>\n{body}\n</information>\n"


def close_action(text: str) -> str:
    """Re-append the closing tag a stop sequence cut off, so the turn parses.

    >>> close_action("<think>x</think><text_search>Paris")
    '<think>x</think><text_search>Paris</text_search>'
    """
    opened = [(m.start(), m.group(1)) for m in re.finditer(r"<(image_search|text_search|answer)>", text)]
    if not opened:
        return text
    _, tag = opened[-1]
    tail = text[opened[-1][0]:]
    return text if f"</{tag}>" in tail else text + f"</{tag}>"


def parse_action(text: str, n_images: int) -> Action:
    """The single action of one policy turn, or an `invalid` action saying why.

    >>> parse_action("<think>find it</think><image_search>2</image_search>", 2).argument
    '2'
    >>> parse_action("<text_search>  Gustave Eiffel birthplace </text_search>", 1).argument
    'Gustave Eiffel birthplace'
    >>> parse_action("<image_search>3</image_search>", 2).kind
    'invalid'
    >>> parse_action("I think it is Paris.", 1).kind
    'invalid'
    """
    think = "\n".join(t.strip() for t in _THINK_RE.findall(text))
    if "<information>" in text:
        return Action("invalid", "the policy wrote an <information> block", think, text)
    found = _ACTION_RE.findall(text)
    if not found:
        return Action("invalid", "no complete action tag", think, text)
    if len(found) > 1:
        return Action("invalid", "more than one action in one turn", think, text)
    kind, arg = found[0][0], unescape(" ".join(found[0][1].split()))
    if kind == "image_search":
        if not arg.isdigit() or not 1 <= int(arg) <= max(n_images, 0):
            return Action("invalid", f"image_search needs an image number 1..{n_images}, got {arg!r}", think, text)
    elif not arg:
        return Action("invalid", f"empty <{kind}>", think, text)
    return Action(kind, arg, think, text)


def trim_to_tokens(text: str, budget: int, count: Callable[[str], int]) -> str:
    """Cut text to at most `budget` tokens (by `count`), ending with an ellipsis when cut.

    >>> trim_to_tokens("one two three four", 2, lambda s: len(s.split()))
    'one two…'
    """
    if budget <= 0:
        return ""
    if count(text) <= budget:
        return text
    lo, hi = 0, len(text)
    while lo < hi:  # longest prefix that fits, by bisection on characters
        mid = (lo + hi + 1) // 2
        if count(text[:mid] + "…") <= budget:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo].rstrip() + "…"


def render_chatml(msgs: Sequence[dict]) -> str:
    """Fallback chat template (ChatML) for models whose template cannot be read.

    >>> render_chatml([{"role": "user", "content": "hi"}])
    '<|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n'
    """
    out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in msgs)
    return out + "<|im_start|>assistant\n"


def render_template(template: str | None, msgs: Sequence[dict], bos: str = "", eos: str = "") -> str:
    """Render chat messages with a model's Jinja chat template, opening the assistant turn."""
    if not template:
        return render_chatml(msgs)
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise jinja2.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=list(msgs), add_generation_prompt=True,
                                            bos_token=bos, eos_token=eos)
