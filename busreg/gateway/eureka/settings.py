"""``EurekaSettings``: the gateway's Eureka API (``BUSREG_GATEWAY__EUREKA__*``), defined with
the other settings in ``busreg.settings`` (``Settings.gateway.eureka``)."""

from __future__ import annotations

from busreg.settings import EurekaSettings

__all__ = ["EurekaSettings"]
