"""The client's stream pipeline: small stages shaped like torchdata.nodes, one file each.

Every stage follows one protocol (base.Node: `reset(state)`, `get_state()`, `next()`, `close()`;
a state is a small dict). A RemoteLoader's pass is, per stream i,
`Prefetch(Decode(StreamReader(i)))`, and an `OrderedMerge` of the streams on top:

- endpoints: the streams' tickets and replica locations, from GetFlightInfo (cached per pass);
- reader: one DoGet stream, resumed from the batch it owes, failing over along its endpoint;
- decode: raw record batch -> the kind's batch, shared-memory refs resolved;
- prefetch: a bounded queue filled by a background thread;
- merge: batch k from stream k % n, in order; its Cursor is the loader's resume point;
- retry: the one retry policy (tenacity) of every call and stream of the client.
"""
