// name: edges
// answers: Every stored match edge of a pack, one row each (what `flowdb export` writes).
// param: pack string required  the pack name
// columns: src_layer, src_module, src_index, dst_layer, dst_module, dst_index, kind, cosine, rank, above
MATCH (d:Feature {pack: $pack, module: 'res'})
WHERE d.layer IS NOT NULL
MATCH (s:Feature)-[e:RESIDUAL|MLP|ATTENTION]->(d)
RETURN s.layer AS src_layer, s.module AS src_module, s.index AS src_index,
       d.layer AS dst_layer, d.module AS dst_module, d.index AS dst_index,
       toLower(type(e)) AS kind, e.cosine AS cosine, e.rank AS rank, e.above AS above
ORDER BY dst_layer, dst_index, kind, rank
