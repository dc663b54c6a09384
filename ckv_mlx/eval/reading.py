"""Beyond question answering (the paper's open question): prompts whose answer draws on
the whole document, a summary or a list of every thing of a kind, over real documents
(``ckv_mlx/data/documents``). No answer is right or wrong here: a record is scored by its
fidelity to the full cache's answer (teacher-forced top-1 agreement and KL), so the
answers run past their first line, to their token limit."""

from __future__ import annotations

from .facts import DOCUMENTS, REAL_KINDS

TASKS = ("summary", "list")
ANSWER_TOKENS = 64
CHARS_PER_TOKEN = 6  # more than English text takes, so one encoding is usually enough
LISTED = {  # what a "list" prompt asks for in each kind's documents
    "manual": "Python type, function or statement",
    "code": "function, class or module",
    "legal": "defined term",
    "financial": "company",
}
PROMPTS = {
    "summary": "\n\nSummarize the document above in a few sentences.\nSummary:",
    "list": "\n\nList every {listed} that the document above names, one per line.\n-",
}


def document_text(kind: str, tokens: int, tokenizer) -> str:
    """The ``kind``'s real documents joined in name order (then the other kinds', where
    they are too short), cut at ``tokens`` tokens."""
    kinds = [kind] + [k for k in REAL_KINDS if k != kind]
    joined = "\n\n".join(path.read_text(encoding="utf-8") for k in kinds
                          for path in sorted((DOCUMENTS / k).glob("*.txt")))
    chars = CHARS_PER_TOKEN * tokens  # encode only about what is needed (warnings past a model's context)
    while len(ids := tokenizer.encode(joined[:chars], add_special_tokens=False)) < tokens and chars < len(joined):
        chars *= 2
    return tokenizer.decode(ids[:tokens])


def prompt(task: str, kind: str) -> str:
    """The question put after the document, completion style."""
    return PROMPTS[task].format(listed=LISTED[kind])
