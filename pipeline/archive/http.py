"""The HTTP session of the DICOMweb and Orthanc REST archives."""

from __future__ import annotations

from typing import Any

import requests

from ..config import ArchiveConfig


class Session(requests.Session):
    """requests' Session, except that the CA file configured for an archive is the one
    that counts: plain requests lets ``$REQUESTS_CA_BUNDLE`` / ``$CURL_CA_BUNDLE`` replace a
    session's ``verify`` on every request, so an archive signed by the site's own CA would
    fail to verify (or, worse, be checked against another bundle) wherever those are set."""

    def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any,
                                   cert: Any) -> Any:
        settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
        if isinstance(self.verify, str) and verify is None:
            settings["verify"] = self.verify
        return settings


def archive_session(config: ArchiveConfig, url: str) -> Session:
    """A session for ``url``: https checked against ``tls.ca_file`` (else the system's CAs),
    never without a check; our client certificate where configured."""
    session = Session()
    if config.tls.enabled or url.startswith("https://"):
        session.verify = config.tls.ca_file or True
        if config.tls.cert_file:
            session.cert = (config.tls.cert_file, config.tls.key_file or config.tls.cert_file)
    return session
