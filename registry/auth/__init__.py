"""Authentication and authorization: htpasswd accounts, a Docker token issuer, access rules."""
