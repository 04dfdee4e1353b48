"""The `generic` provider: any plain JSON API."""

from plugins.base import GenericPlugin

__all__ = ["GenericPlugin"]
