"""Public data shipped with the package and its loaders (licences in ATTRIBUTION.md)."""
