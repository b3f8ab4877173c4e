"""OCPP 1.6J / 2.0.1 central system that represents each EVSE as an S2 resource manager.

Modules: `csms` (the central system: chargers, sessions, limits), `s2_evse` (one S2 RM per EVSE
on `resource_managers.base`), `frbc` (pure S2 FRBC mapping), `limits` (currents and OCPP
charging profiles), `records` (sessions and CDRs in SQLite), `simulator` (simulated charge
points and EVs on the real protocol), `cli` (the `cem` commands).

In-process use (e.g. `cem demo`)::

    csms = OcppCentralSystem(site, cem_url, port=0)      # cem_url=None: OCPP only, no S2
    await csms.start(); csms.port                          # the bound port
    stations = stations_for_site(site, f"ws://127.0.0.1:{csms.port}", speed=60)
    fleet = asyncio.create_task(run_fleet(stations, built_in_arrivals(len(stations)), stop))
    ...; stop.set(); await fleet; await csms.stop()
"""
