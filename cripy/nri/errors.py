"""The error of NRI plugins, apart from the plugin machinery so that the lifecycle hooks
can name it without loading that machinery on nodes that run no plugins."""

from __future__ import annotations

from cripy.errors import FailedPreconditionError


class PluginError(FailedPreconditionError):
    """A plugin answered a request with an error."""
