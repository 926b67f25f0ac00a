// name: new-features
// answers: Features of pack B that are new in a link set (flowdb link): their top-1 in A is at or
// answers: below chance. Per layer and module, most distant first, with the nearest feature of A.
// param: link string required  the link set's name (flowdb link --name; default A--B)
// param: layer int null  only this layer (default: all)
// param: module string null  only this module (default: all linked)
// choices: module res, mlp, att
// param: limit int 100  at most this many rows
// columns: key, layer, module, index, label, url, cosine, chance, nearest_key, nearest_label
MATCH (:LinkSet {name: $link})-[:HAS_PLACE]->(place:LinkPlace)
WHERE ($layer IS NULL OR place.layer = $layer) AND ($module IS NULL OR place.module = $module)
MATCH (f:Feature)-[r:ALIGNS {link: $link, category: 'new'}]->(nearest:Feature)
WHERE f.layer = place.layer AND f.module = place.module
RETURN f.key AS key, f.layer AS layer, f.module AS module, f.index AS index, f.label AS label,
       COLLECT { MATCH (s:SAE {key: f.pack + '/' + toString(f.layer) + '/' + f.module}) RETURN s.np_url + toString(f.index) }[0] AS url,
       r.cosine AS cosine, place.chance_ba AS chance, nearest.key AS nearest_key, nearest.label AS nearest_label
ORDER BY layer, module, cosine, index
LIMIT $limit
