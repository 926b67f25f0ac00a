// name: family
// answers: A feature's relatives in every pack it is linked with (flowdb link): its matches there
// answers: and the features that match it, per link set best first, with each side's link category.
// param: feature string required  the feature, PACK/LAYER/MODULE/INDEX
// param: above_only bool false  only relatives matched at or above the link's threshold (either way)
// param: limit int 100  at most this many rows
// columns: link, side, relative_key, relative_pack, relative_layer, relative_module, relative_index, cosine, rank, back_rank, above, relative_category, category, label, relative_label, url, relative_url
MATCH (f:Feature {key: $feature})-[r:ALIGNS]-(g:Feature)
// One row per relative and link set: the feature's match of it and its match of the feature.
WITH f, g, r.link AS link, collect(r) AS both
WITH f, g, link, [r IN both WHERE startNode(r) = f][0] AS out, [r IN both WHERE startNode(r) = g][0] AS back
WITH f, g, link, out, back, coalesce(out.above, false) OR coalesce(back.above, false) AS above
WHERE above OR NOT $above_only
MATCH (l:LinkSet {name: link})
// Every feature of a linked place starts an ALIGNS of its link: its first one carries its category.
RETURN link, CASE f.pack WHEN l.a THEN 'a' ELSE 'b' END AS side, g.key AS relative_key, g.pack AS relative_pack,
       g.layer AS relative_layer, g.module AS relative_module, g.index AS relative_index,
       coalesce(out.cosine, back.cosine) AS cosine, out.rank AS rank, back.rank AS back_rank, above,
       coalesce(back.category, COLLECT { MATCH (g)-[x:ALIGNS {link: link}]->() RETURN x.category LIMIT 1 }[0]) AS relative_category,
       coalesce(out.category, COLLECT { MATCH (f)-[x:ALIGNS {link: link}]->() RETURN x.category LIMIT 1 }[0]) AS category,
       f.label AS label, g.label AS relative_label,
       COLLECT { MATCH (s:SAE {key: f.pack + '/' + toString(f.layer) + '/' + f.module}) RETURN s.np_url + toString(f.index) }[0] AS url,
       COLLECT { MATCH (s:SAE {key: g.pack + '/' + toString(g.layer) + '/' + g.module}) RETURN s.np_url + toString(g.index) }[0] AS relative_url
ORDER BY link, cosine DESC, relative_key
LIMIT $limit
