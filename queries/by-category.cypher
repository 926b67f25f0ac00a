// name: by-category
// answers: The residual features of one category (translated, processed, newborn or from-nowhere)
// answers: at one layer of a pack, by index, with the top-1 scores that placed them there.
// param: pack string required  the pack name
// param: layer int required  the layer
// param: category string required  translated, processed, newborn or from-nowhere
// choices: category translated, processed, newborn, from-nowhere
// param: limit int 100  at most this many rows
// columns: key, index, category, s_res, s_mlp, s_att, label, url
MATCH (f:Feature {pack: $pack, layer: $layer, module: 'res'})
WHERE f.category = $category
RETURN f.key AS key, f.index AS index, f.category AS category, f.s_res AS s_res, f.s_mlp AS s_mlp,
       f.s_att AS s_att, f.label AS label,
       COLLECT { MATCH (s:SAE {key: f.pack + '/' + toString(f.layer) + '/res'}) RETURN s.np_url + toString(f.index) }[0] AS url
ORDER BY index
LIMIT $limit
