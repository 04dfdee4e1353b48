"""The outbox (contract 7.6, docs/outbox.md): sends kept durably, answered "accepted" in
the provider's shape, and delivered in the background through the upstream's pipeline.

    store.py         the entry, its states, the store protocol, the in-memory store
    sqlite_store.py  the store in the data dir (the durable store's database)
    redis_store.py   the store in Redis (`--redis`): every replica's sends, shared
    stage.py         the pipeline stage that keeps a send and answers for the provider
    worker.py        the delivery worker (a supervised task of the server)
"""
