"""Every text the service says to a user, in one place so wording stays consistent."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storage.stats import Summary


def empty_message() -> str:
    return "Your message was empty. Write a question and I'll answer it."


def too_long(length: int, limit: int) -> str:
    return (
        f"Your message is {length:,} characters long; I can take at most {limit:,}. "
        "Please shorten it or split it up. (It was not saved.)"
    )


def too_many_tokens(tokens: int, budget: int) -> str:
    return (
        f"Your message is about {tokens:,} tokens long, more than the {budget:,} I can read "
        "at once. Please shorten it or split it up. (It was not saved.)"
    )


RELOADED_EVERYWHERE = "(Every other process of this deployment reads its file within seconds.)"


def system_prompt_too_long() -> str:
    return (
        "The instructions I am given here (the system prompt) are longer than I can read at "
        "once, so I cannot answer here: please ask an admin to shorten them. (Your message "
        "was not saved.)"
    )


def history_dropped(count: int) -> str:
    noun = "message" if count == 1 else "messages"
    return (
        f"({count} older {noun} of this conversation no longer fit the model's context, "
        "so I left them out.)"
    )


def answer_kept(answer: str, why: str) -> str:
    """A regenerated answer that could not be written: the old one stays, and says why."""
    return f"{answer}\n\n_(No new answer: {why})_"


def busy() -> str:
    return "I'm busy with other questions right now. Please try again in a minute."


def waiting_for_room() -> str:
    return "I'm busy with other questions right now; I'll answer this one as soon as I can."


SEND_AGAIN = "send that again. (It was not saved.)"
PRESS_AGAIN = "press the button again."  # a Regenerate pressed over a user's limits


def slow_down(pending: int, again: str = SEND_AGAIN) -> str:
    noun = "message" if pending == 1 else "messages"
    return (
        f"I'm still working on your {pending} earlier {noun}. Please wait for those answers, "
        f"then {again}"
    )


def timed_out() -> str:
    return "Sorry, that took too long to answer. Please try again, perhaps with a shorter question."


def writing_again() -> str:
    return "(Writing the answer again from the start…)"


def failed() -> str:
    return "Sorry, something went wrong while answering. Your message is saved; please try again."


def empty_answer() -> str:
    return "(The model gave an empty answer. Try rephrasing your question.)"


def only_reasoning() -> str:
    return (
        "(The model spent its whole answer thinking it over and wrote no reply. "
        "Try again, or ask a narrower question.)"
    )


def conversation_reset() -> str:
    return "Conversation cleared. The next message starts a new one."


def unknown_channel() -> str:
    return (
        "I can't run commands in this kind of channel yet: run them in a thread, a text "
        "channel or a DM."
    )


def forgotten(dropped: int = 0) -> str:
    """`dropped`: messages sent before the `forget` that waited for a later try."""
    text = "I deleted everything I had stored of this conversation."
    if dropped:
        waiting = "message" if dropped == 1 else f"{dropped} messages"
        text += f" The {waiting} sent before it, still waiting for an answer, will not be answered."
    return text


def storage_unavailable() -> str:
    return (
        "My storage is unavailable right now, so I could not take your message. "
        "Please try again in a minute."
    )


def storage_lost() -> str:
    return "_I lost my storage for a moment; I'll answer this as soon as it is back._"


def restarting() -> str:
    return "_I'm restarting; I'll answer this as soon as I'm back._"


def restarting_resend(again: str = "send that again") -> str:
    return f"I'm restarting right now. Please {again} in a minute."


def gave_up(attempts: int) -> str:
    return (
        f"Sorry, I could not answer this message after {attempts} tries. "
        "Please ask again, perhaps in other words."
    )


def continuation_failed() -> str:
    return "(The rest of this answer could not be posted. Please ask again for the rest.)"


def denied() -> str:
    return "Sorry, I'm not set up to answer here. Ask your workspace admins if you need me."


def rate_limited(wait_s: float, again: str = SEND_AGAIN) -> str:
    return (
        f"You're asking faster than I'm allowed to answer. Please wait "
        f"{max(1, round(wait_s))} s and {again}"
    )


def not_starter(command: str) -> str:
    return f"Only the person who started this conversation, or an admin, can `{command}` it."


def admins_only(command: str) -> str:
    return f"Only admins can use `{command}`."


def still_answering(command: str) -> str:
    """For a `reset` or `forget` that waited `COMMAND_WAIT_S` for the answers before it."""
    return (
        f"Answers are still being written here, so nothing was done: send `{command}` again "
        "once they are finished."
    )


def nothing_stored(command: str) -> str:
    """For a `reset` or `forget` where nothing is stored: a DM or chat with no messages
    yet, or a channel's top level, whose threads are each a conversation of their own."""
    return (
        f"Nothing to {command}: no conversation with me is stored here. In a channel, each "
        f"thread is its own: type `{command}` in the thread you mean."
    )


def help_text(*, admin: bool) -> str:
    lines = [
        "Mention me or message me and I answer in the thread, remembering the thread.",
        "Commands (type them in the thread, or use the slash command):",
        "• `help`: this list",
        "• `reset`: start this conversation over (its starter or an admin)",
        "• `forget`: delete everything I stored of it (its starter or an admin)",
        "• `status`: the model, the queue, your place in it",
        "• `prompt`: the system prompt in effect here",
    ]
    if admin:
        lines += [
            "• `reload`: read the configuration file again (admins)",
            "• `stats`: turns, tokens and latency over the last hour (admins)",
        ]
    return "\n".join(lines)


def status(*, model: str, depth: int, room: int, places: list[int]) -> str:
    yours = ", ".join("being answered" if place == 0 else f"#{place} in line" for place in places)
    return (
        f"Model: {model}.\nQueue: {depth} answering or waiting, room for {room} more.\n"
        f"Yours: {yours or 'none'}."
    )


def prompt_in_effect(prompt: str | None, *, max_new_tokens: int, temperature: float | None) -> str:
    if prompt is None:
        text = "No system prompt is set here: the model's own default applies."
    else:
        # A fence in the prompt would close the one it is shown in: a zero-width space
        # after each backtick that begins a run of three keeps it whole on both platforms.
        unfenced = re.sub(r"`(?=``)", "`\u200b", prompt)
        text = f"The system prompt here:\n```\n{unfenced}\n```"
    heat = "the model's default" if temperature is None else temperature
    return f"{text}\nAnswers: up to {max_new_tokens} tokens, temperature {heat}."


def last_hour(summary: Summary) -> str:
    if not summary.turns:
        return "No answers in the last hour."
    answers = "1 answer" if summary.turns == 1 else f"{summary.turns:,} answers"
    return (
        f"Last hour: {answers}, {summary.prompt_tokens:,} prompt tokens, "
        f"{summary.answer_tokens:,} answer tokens; latency p50 {summary.p50_s:.1f} s, "
        f"p95 {summary.p95_s:.1f} s (from message to the whole answer)."
    )


def unknown_command(typed: str) -> str:
    return f"There is no command {typed}: /help lists them, and /quit (or Ctrl-D) leaves."


def cut_repeating() -> str:
    return "(cut: the answer was repeating itself)"


def stopped() -> str:
    return "_(stopped)_"


def not_regenerable() -> str:
    return (
        "Only the newest answer of a conversation can be regenerated, and only while no other "
        "answer is being written there."
    )
