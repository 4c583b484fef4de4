"""A Eureka-compatible REST API in ``busreg gateway``: Spring Cloud Netflix and
py-eureka-client use busreg unchanged (docs/eureka.md).

    from busreg.gateway.eureka import eureka_mount
    app.router.routes.append(eureka_mount(settings, settings.gateway.eureka))  # at /eureka

* ``codec``: Eureka's JSON and XML documents, both directions, and ``apps__hashcode``;
* ``mapping``: Eureka's InstanceInfo ↔ busreg ``Instance`` and ingest events;
* ``live``: the live views the answers are made from; ``auth``: who may write what;
* ``routes``: the endpoints.
"""

from busreg.gateway.eureka.routes import EurekaApi, eureka_mount
from busreg.gateway.eureka.settings import EurekaSettings

__all__ = ["EurekaApi", "EurekaSettings", "eureka_mount"]
