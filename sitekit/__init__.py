"""What the CEM and the resource managers both use, and nothing else: the process clock.

`resource_managers` imports nothing from `cem`; both import this package.
"""
