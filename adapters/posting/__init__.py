"""Scheduled posts: the sinks that publish, slot arithmetic, and the poster that ties them together."""

__all__: list[str] = []
