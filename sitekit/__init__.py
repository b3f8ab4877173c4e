"""What the CEM and the resource managers both use, and nothing else: the process clock
(`clock`), day-ahead price sources (`prices`) and the config machinery (`config`: strict
sections, TLS files, problems with line and hint, the shared `[ev_defaults]`).

`resource_managers` imports nothing from `cem`; both import this package.
"""
