"""Clinical decision support: CDS Hooks services over the engine, with FHIR output.

One noun per module, none imports FastAPI (the HTTP adapter is `service.api.cds.routes`):
`mapping` (how FHIR data becomes a model's features; with `terms`, its codes, `services`, its
CDS services, and `fit`, whether it fits a model version), `extraction` (reading a hook's prefetch),
`hooks` (request bodies), `catalogue` (services offered), `fhir` (resources written),
`cards` (what the clinician sees), `ledger` (issued cards and their feedback), `trust` (the
client's JWT). See docs/CLINICAL.md.
"""
