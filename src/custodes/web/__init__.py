"""The dashboard and JSON API: nothing served to anyone unauthenticated, ever.

`app.create_app` wires the pages, the API and the security middleware around one Vault;
`deps` is the only place a request becomes a session; `serve` runs it under uvicorn.
"""
