"""The elasticmoe Kubernetes operator (kopf).

- :mod:`.crd`: the ``MoEDeployment`` CRD as data (single source of the chart's CRD file)
- :mod:`.spec`: spec validation and defaults
- :mod:`.render`: pure functions building the RayCluster, ConfigMap, scale plans, status
- :mod:`.admin`: client of the controller's admin API (demand, drain)
- :mod:`.kube`: the Kubernetes API wrapper
- :mod:`.handlers`: reconcile/scale/delete handlers
- :mod:`.main`: the kopf decorators; run with ``elasticmoe-operator``
"""
