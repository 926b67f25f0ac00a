// name: splits
// answers: Features of pack A that are split in a link set (flowdb link), with their children in B
// answers: (matches at or above the threshold); parents ordered by their children's summed cosine.
// param: link string required  the link set's name (flowdb link --name; default A--B)
// param: layer int null  only this layer (default: all)
// param: module string null  only this module (default: all linked)
// choices: module res, mlp, att
// param: limit int 50  at most this many parents
// columns: parent_key, layer, module, parent_index, parent_label, parent_url, n_children, children_cosine, child_key, child_index, cosine, rank, child_category, child_label, child_url
MATCH (:LinkSet {name: $link})-[:HAS_PLACE]->(place:LinkPlace)
WHERE ($layer IS NULL OR place.layer = $layer) AND ($module IS NULL OR place.module = $module)
MATCH (parent:Feature)-[r:ALIGNS {link: $link, category: 'split'}]->(child:Feature)
WHERE parent.layer = place.layer AND parent.module = place.module AND r.above
WITH parent, r, child ORDER BY r.rank
WITH parent, collect({r: r, child: child}) AS children
WITH parent, children, reduce(total = 0.0, c IN children | total + c.r.cosine) AS children_cosine
ORDER BY children_cosine DESC, parent.key
LIMIT $limit
UNWIND children AS c
WITH parent, children, children_cosine, c.r AS r, c.child AS child
RETURN parent.key AS parent_key, parent.layer AS layer, parent.module AS module, parent.index AS parent_index,
       parent.label AS parent_label,
       COLLECT { MATCH (s:SAE {key: parent.pack + '/' + toString(parent.layer) + '/' + parent.module}) RETURN s.np_url + toString(parent.index) }[0] AS parent_url,
       size(children) AS n_children, children_cosine, child.key AS child_key, child.index AS child_index,
       r.cosine AS cosine, r.rank AS rank,
       COLLECT { MATCH (child)-[x:ALIGNS {link: $link}]->() RETURN x.category LIMIT 1 }[0] AS child_category,
       child.label AS child_label,
       COLLECT { MATCH (s:SAE {key: child.pack + '/' + toString(child.layer) + '/' + child.module}) RETURN s.np_url + toString(child.index) }[0] AS child_url
ORDER BY children_cosine DESC, parent_key, rank
