"""What a Discord message says, as the persona should read it.

Discord's app makes a message longer than 2,000 characters into a text file
(``message.txt``), and a person cannot send it any other way: a text file is read as
part of its message (``TextFiles``, up to ``TEXT_FILE_MAX_BYTES``; a bigger one, or one not
in UTF-8, raises ``UnreadableFile`` with a sentence for its sender). Mentions of people,
roles and channels, custom emoji, commands and times are read as the app shows them
(``@ada``, ``#general``), not as the codes in the message (``<@123>``): ``readable``, which
reads a slash command's text the same way, naming what it mentions from the interaction.
"""

from __future__ import annotations

import datetime as dt
import logging
import mimetypes
import re
from collections import OrderedDict

import aiohttp
import discord

__all__ = [
    "FILE_NOTICE_PATTERN",
    "TEXT_FILE_MAX_BYTES",
    "TextFiles",
    "UnreadableFile",
    "is_text_file",
    "readable",
]

log = logging.getLogger(__name__)

# A text file sent with a message is read as part of it; a bigger one is refused unread, saying so.
TEXT_FILE_MAX_BYTES = 100_000
FILE_TOO_BIG_TEXT = (
    "I couldn't read your file {name}: it is {size}, and I read text files of up to {limit}. "
    "Please send me the part that matters, as a message or a smaller file."
)
FILE_NOT_UTF8_TEXT = (
    "I couldn't read your file {name}: it is not UTF-8 text. Please save it as UTF-8 (or paste the "
    "part that matters) and send it again."
)
FILE_NOT_DOWNLOADED_TEXT = "I couldn't read your file {name}: Discord would not let me download it ({reason}). Please send it again."
# What the bot says of a file: not the persona's words, so a reply chain leaves it out.
FILE_NOTICE_PATTERN = re.compile(
    "|".join(
        ".+".join(re.escape(part) for part in re.split(r"\{\w+\}", template))
        for template in (FILE_TOO_BIG_TEXT, FILE_NOT_UTF8_TEXT, FILE_NOT_DOWNLOADED_TEXT)
    ),
    re.DOTALL,
)
# Files read lately, by attachment id: a reply chain holding a paste reads it at every reply.
MAX_CACHED_FILES = 32
# Discord's markup: a mention of a person, role or channel, a custom emoji, a command, a time.
_MARKUP = re.compile(r"<(@!?|@&|#)(\d+)>|<a?:(\w+):\d+>|</([\w -]+):\d+>|<t:(\d{1,11})(?::[a-zA-Z])?>")


def readable(client: discord.Client, source: discord.Message | discord.Interaction, text: str) -> str:
    """``text`` (a message's, or a slash command's option) with Discord's markup as its app shows it
    (``@ada``, ``@role``, ``#general``, ``:emoji:``, ``/command``, a date) rather than codes
    (``<@123>``) the persona cannot read. Names come from the server, then those ``source``
    carries (``_carried_names``), then ``client``'s cache."""
    guild = source.guild
    carried = _carried_names(source)

    def shown(match: re.Match) -> str:
        kind, number, emoji, command, seconds = match.groups()
        if emoji or command:
            return f":{emoji}:" if emoji else f"/{command}"
        if seconds:
            return dt.datetime.fromtimestamp(int(seconds), dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
        key = int(number)
        if kind == "#":
            return f"#{getattr(client.get_channel(key), 'name', None) or carried.get(key) or 'unknown-channel'}"
        if kind == "@&":
            role = guild.get_role(key) if guild is not None else None
            return f"@{role.name if role else carried.get(key) or 'unknown-role'}"
        member = guild.get_member(key) if guild is not None else None
        person = member.display_name if member else carried.get(key)
        if person is None:
            person = getattr(client.get_user(key), "display_name", None)
        return f"@{person or 'unknown-user'}"

    return _MARKUP.sub(shown, text)


def _carried_names(source: discord.Message | discord.Interaction) -> dict[int, str]:
    """The names an event carries for what it mentions, by id: a message's mentioned people; a slash
    command's ``resolved`` people, roles and channels (there is no message to name them, and
    Discord names in ``resolved`` those its options mention)."""
    if isinstance(source, discord.Message):
        return {person.id: person.display_name for person in source.mentions}
    resolved = (source.data or {}).get("resolved") or {}
    names = {int(i): u.get("global_name") or u.get("username", "") for i, u in resolved.get("users", {}).items()}
    names |= {int(i): m["nick"] for i, m in resolved.get("members", {}).items() if m.get("nick")}
    for kind in ("roles", "channels"):
        names |= {int(i): found["name"] for i, found in resolved.get(kind, {}).items() if found.get("name")}
    return {key: name for key, name in names.items() if name}


class UnreadableFile(Exception):
    """A text file sent to the bot that it cannot read; the message says why, to its sender."""


def is_text_file(attachment: discord.Attachment) -> bool:
    """Whether an attachment is a text file (``message.txt``, notes, code), by the type Discord
    gives it, or by its name where it gives none."""
    kind = attachment.content_type or mimetypes.guess_type(attachment.filename)[0] or ""
    return kind.split(";")[0].strip().lower().startswith("text/")


class TextFiles:
    """Text files' texts, each downloaded once (the latest ``MAX_CACHED_FILES``)."""

    def __init__(self) -> None:
        self._texts: OrderedDict[int, str] = OrderedDict()  # attachment id → text

    async def read(self, attachment: discord.Attachment) -> str:
        """A text file's text; ``UnreadableFile`` if too big (left unread), not to be
        downloaded, or not UTF-8."""
        if attachment.id in self._texts:
            self._texts.move_to_end(attachment.id)
            return self._texts[attachment.id]
        name = attachment.filename
        too_big = FILE_TOO_BIG_TEXT.format(
            name=name, size=f"{-(-attachment.size // 1000):,} KB", limit=f"{TEXT_FILE_MAX_BYTES // 1000:,} KB"
        )
        if attachment.size > TEXT_FILE_MAX_BYTES:
            raise UnreadableFile(too_big)
        try:
            data = await attachment.read()
        except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
            log.warning("could not download the file %s (%s): %s", name, attachment.url, exc)
            raise UnreadableFile(FILE_NOT_DOWNLOADED_TEXT.format(name=name, reason=exc)) from None
        if len(data) > TEXT_FILE_MAX_BYTES:
            raise UnreadableFile(too_big)
        try:
            text = data.decode("utf-8-sig").replace("\r\n", "\n").strip()
        except UnicodeDecodeError:
            raise UnreadableFile(FILE_NOT_UTF8_TEXT.format(name=name)) from None
        self._texts[attachment.id] = text
        if len(self._texts) > MAX_CACHED_FILES:
            self._texts.popitem(last=False)
        return text
