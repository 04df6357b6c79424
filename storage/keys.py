"""Every Redis key threadbot writes, built in this one place.

Owns key names only; it must not talk to Redis. Change a layout here and nowhere else.
"""

from __future__ import annotations

PREFIX = "threadbot:"
CONVERSATION_PREFIX = f"{PREFIX}conversation:"
CLEARED_PREFIX = f"{PREFIX}cleared:"
CUT_PREFIX = f"{PREFIX}forgotten:"  # named when only a forget left a cut; kept for those
SEEN_PREFIX = f"{PREFIX}seen:"
HEARD_PREFIX = f"{PREFIX}heard:"
TURN_PREFIX = f"{PREFIX}turn:"
TURN_LOCK_PREFIX = f"{PREFIX}turn-lock:"
PENDING_TURNS = f"{PREFIX}pending-turns"
PENDING_BY_PREFIX = f"{PREFIX}pending-by:"
PENDING_IN_PREFIX = f"{PREFIX}pending-in:"
OWNER_PREFIX = f"{PREFIX}owner:"
FACTS_PREFIX = f"{PREFIX}facts:"
DENIED_PREFIX = f"{PREFIX}denied:"
RATE_PREFIX = f"{PREFIX}rate:"
RATE_TAKEN_PREFIX = f"{PREFIX}rate-taken:"
TURN_STATS_PREFIX = f"{PREFIX}turn-stats:"
ANSWER_PLACE_PREFIX = f"{PREFIX}answer-place:"
JOINING_PREFIX = f"{PREFIX}joining:"
REGENERATED_PREFIX = f"{PREFIX}regenerated:"
ONCE_PREFIX = f"{PREFIX}once:"
TEAM_RELOADS_PREFIX = f"{PREFIX}team-reloads:"
WRITE_PROBE = f"{PREFIX}write-probe"  # set for a moment at start: may Redis be written?


def conversation(conversation_id: str) -> str:
    """The list holding one conversation; the id is `str(ConversationKey)`."""
    return f"{CONVERSATION_PREFIX}{conversation_id}"


def cleared(conversation_id: str) -> str:
    """The marker that a conversation was reset: known to the bot, with no history."""
    return f"{CLEARED_PREFIX}{conversation_id}"


def cut(conversation_id: str) -> str:
    """When a conversation was last reset or forgotten, and by which message (its platform
    id): a thread's messages from before it are not read again as its context. No
    content."""
    return f"{CUT_PREFIX}{conversation_id}"


def seen(platform: str, message_id: str) -> str:
    """The marker that a platform message was already handled."""
    return f"{SEEN_PREFIX}{platform}:{message_id}"


def heard(platform: str, bot: str) -> str:
    """The private channels (DMs) where one bot (its user id) was spoken to lately, by
    when (a sorted set): where it looks for messages sent while it was away."""
    return f"{HEARD_PREFIX}{platform}:{bot}"


def turn(turn_id: str) -> str:
    """The hash holding one accepted, not yet answered turn (its pending record)."""
    return f"{TURN_PREFIX}{turn_id}"


def pending_by(platform: str, user: str) -> str:
    """The ids of one user's accepted turns: an index into PENDING_TURNS, read through it
    (a turn finished since stays here until then)."""
    return f"{PENDING_BY_PREFIX}{platform}:{user}"


def pending_in(conversation_id: str) -> str:
    """The ids of one conversation's accepted turns, scored by acceptance: an index into
    PENDING_TURNS, read through it (a turn finished since stays here until then)."""
    return f"{PENDING_IN_PREFIX}{conversation_id}"


def turn_lock(conversation_id: str) -> str:
    """The lease of the process answering a turn of the conversation now."""
    return f"{TURN_LOCK_PREFIX}{conversation_id}"


def owner(owner_id: str) -> str:
    """A running process's lease; its pending turns may be claimed once it expires."""
    return f"{OWNER_PREFIX}{owner_id}"


def joining(conversation_id: str) -> str:
    """Set while a process takes the bot into a conversation (a mention being read)."""
    return f"{JOINING_PREFIX}{conversation_id}"


def facts(conversation_id: str) -> str:
    """The hash of a conversation's facts: who started it, its system prompt as filled in."""
    return f"{FACTS_PREFIX}{conversation_id}"


def denied(whom: str) -> str:
    """The marker that a person was told, within the hour, that the bot may not answer them
    in a channel (`platform:workspace:channel:user`)."""
    return f"{DENIED_PREFIX}{whom}"


def rate(user: str) -> str:
    """One user's token bucket (`platform:user`)."""
    return f"{RATE_PREFIX}{user}"


def rate_taken(message: str) -> str:
    """What taking from the bucket gave one message (`platform:message id`), for its
    re-deliveries."""
    return f"{RATE_TAKEN_PREFIX}{message}"


def team_reloads(scope: str) -> str:
    """The count of the `reload` commands run, which every process of one deployment
    (one scope) follows."""
    return f"{TEAM_RELOADS_PREFIX}{scope}"


def turn_stats(scope: str) -> str:
    """The sorted set of recently answered turns (latency and token counts), scored by
    when each was answered; every process of one deployment writes the same scope."""
    return f"{TURN_STATS_PREFIX}{scope}"


def answer_message(message: str) -> str:
    """The conversation whose answer a platform message (`platform:id`) shows."""
    return f"{PREFIX}answer-message:{message}"


def answer_place(conversation_id: str) -> str:
    """Where a conversation's newest answer is shown (platform JSON), for its buttons."""
    return f"{ANSWER_PLACE_PREFIX}{conversation_id}"


def once(token: str) -> str:
    """That the call with this token made its write (`storage.once`)."""
    return f"{ONCE_PREFIX}{token}"


def regenerated(conversation_id: str, place_digest: str) -> str:
    """Set once the answer shown at a place (by its digest) is being regenerated."""
    return f"{REGENERATED_PREFIX}{conversation_id}:{place_digest}"


# --- Jobs for inference workers (`threadbot run --role gateway|worker`) --------------------

JOBS = f"{PREFIX}jobs"
"""The stream of jobs any worker may take (one consumer group, `WORKERS_GROUP`)."""
DEAD_JOBS = f"{PREFIX}jobs:dead"
"""Jobs given up after JOB_MAX_DELIVERIES tries, kept for an operator to look at; each
entry's `conversation` field names its conversation, for `forget`."""
WORKERS = f"{PREFIX}workers"
"""The set of worker names that have run; the live ones also have a `worker` key."""
WORKERS_GROUP = "workers"


def worker_jobs(worker: str) -> str:
    """The stream of jobs meant for one worker: the conversations whose KV cache it holds."""
    return f"{JOBS}:worker:{worker}"


def worker(worker: str) -> str:
    """A worker's heartbeat: it lives while this key does."""
    return f"{PREFIX}worker:{worker}"


def worker_failing(worker: str) -> str:
    """Set for a while after an answer failed on a worker: the others take the jobs it
    hands back."""
    return f"{PREFIX}worker-failing:{worker}"


def job_chunks(job_id: str) -> str:
    """The stream of one job's answer, as its worker writes it."""
    return f"{PREFIX}job:{job_id}:chunks"


def job_cancel(job_id: str) -> str:
    """The marker that a job's answer is no longer wanted."""
    return f"{PREFIX}job:{job_id}:cancel"


def job_answered(job_id: str) -> str:
    """The marker that a job's answer was read to its end: no worker runs it again."""
    return f"{PREFIX}job:{job_id}:answered"


def job_dead(job_id: str) -> str:
    """The marker that a job was put in `DEAD_JOBS`: it goes there once."""
    return f"{PREFIX}job:{job_id}:dead"


def job_passed_on(job_id: str) -> str:
    """The set of a job's tries (their delivery counts) that a stopping worker handed
    back unfinished: deliveries, not failures, which do not count towards giving it up."""
    return f"{PREFIX}job:{job_id}:passed-on-tries"  # a set (a count, by another name, before)


def job_sent(job_id: str) -> str:
    """Where a gateway sent a job (its stream and entry id), for a retry of the send whose
    reply was lost: a cancel then still takes the job out of its stream."""
    return f"{PREFIX}job:{job_id}:sent"


def job_asked(fingerprint: str) -> str:
    """The id of the job sent for one request (`Job.fingerprint`), while it may be read: a
    gateway that resumes the same request reads that job's answer instead of asking again."""
    return f"{PREFIX}job:asked:{fingerprint}"


def gateway_wake(gateway: str) -> str:
    """A gateway's own stream, written to wake its reader when it has a new job to watch."""
    return f"{PREFIX}gateway:{gateway}:wake"
